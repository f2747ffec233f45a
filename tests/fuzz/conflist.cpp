// The primary CNI's config file, as the installer chains podsteer-cni into it.
#include <cstddef>
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "cni_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string out;
  auto r = podsteer::cni::chain_into(std::string(reinterpret_cast<const char*>(data), size), "/run/podsteer/cni.sock", out);
  if (r && *r) {
    // what we write parses, has our plugin last, and chaining again changes nothing
    auto j = nlohmann::json::parse(out);
    if (j["plugins"].back()["type"] != "podsteer-cni") __builtin_trap();
    std::string again;
    auto r2 = podsteer::cni::chain_into(out, "/run/podsteer/cni.sock", again);
    if (!r2 || *r2) __builtin_trap();
  }
  return 0;
}
