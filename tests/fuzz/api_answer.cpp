// What podsteer-cni reads from the API server when the agent is away: an HTTP answer off
// the wire, then the pod or namespace in its body, then the enablement rules over them.
#include <cstddef>
#include <cstdint>
#include <string>

#include "http_get.h"
#include "kube_policy.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto answer = podsteer::cni::parse_http_answer(std::string(reinterpret_cast<const char*>(data), size));
  if (!answer) return 0;
  auto j = nlohmann::json::parse(answer->body, nullptr, false);
  if (j.is_discarded()) return 0;
  auto pod = podsteer::kube::parse_pod(j);
  auto ns = podsteer::kube::parse_namespace(j);
  if (pod) {
    podsteer::kube::Labels labels = ns ? ns->second : podsteer::kube::Labels{};
    (void)podsteer::kube::LabelPolicy{}.enrolled(*pod, &labels);
    (void)podsteer::kube::pod_overrides(*pod);
  }
  return 0;
}
