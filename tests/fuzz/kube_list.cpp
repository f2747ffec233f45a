// A list answer from the API server (pods or namespaces), and a single GET pod/namespace.
#include <cstddef>
#include <cstdint>
#include <string>

#include "kube_source.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto j = nlohmann::json::parse(reinterpret_cast<const char*>(data), reinterpret_cast<const char*>(data) + size, nullptr,
                                 false);
  if (j.is_discarded()) return 0;
  if (auto list = podsteer::kube::parse_list(j)) {
    for (const auto& item : list->items) {
      (void)podsteer::kube::parse_pod(item);
      (void)podsteer::kube::parse_namespace(item);
    }
  }
  if (auto pod = podsteer::kube::parse_pod(j)) {
    podsteer::kube::LabelPolicy policy;
    podsteer::kube::Labels ns = {{"istio.io/dataplane-mode", "ambient"}};
    (void)policy.enrolled(*pod, &ns);
  }
  (void)podsteer::kube::parse_namespace(j);
  return 0;
}
