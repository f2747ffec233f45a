// podsteer-cni's request line, as the agent parses it.
#include <cstddef>
#include <cstdint>
#include <string>

#include "cni_request.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto r = podsteer::parse_cni_request(std::string(reinterpret_cast<const char*>(data), size));
  if (r) (void)r->pod.full_name();
  else (void)r.error().message();
  return 0;
}
