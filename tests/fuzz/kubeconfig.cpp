// A kubeconfig file.
#include <cstddef>
#include <cstdint>
#include <string>

#include "kube_client.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = podsteer::kube::parse_kubeconfig(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!r) (void)r.error().message();
  return 0;
}
