// When the agent cannot be reached, podsteer-cni asks the API server itself whether the pod
// is one the agent would capture, as istio-cni's plugin does (cni/pkg/plugin/plugin.go):
// the same pod and namespace GETs and the same enablement rules as the agent
// (controller/kube_policy.h). A pod that would not be captured may start without the agent;
// one that would must wait for it; and when the API cannot say, neither can we.
#pragma once

#include <string>

#include "cni_plugin.h"
#include "result.h"

namespace podsteer::cni {

// Whether the agent would capture pod NAMESPACE/NAME (whose UID the runtime gave, if any);
// an error when the API cannot say (unreachable, refused, another pod of that name).
Result<bool> enrolled_by_api(const PluginConf& conf, const std::string& pod_namespace, const std::string& pod_name,
                             const std::string& pod_uid);

}  // namespace podsteer::cni
