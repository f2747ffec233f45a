// CNI requests from podsteer-cni: ADD captures an enrolled pod before its app starts, DEL
// releases it, CHECK says whether it is whole.
#include <algorithm>
#include <chrono>

#include "agent.h"
#include "cni_request.h"
#include "log.h"

namespace podsteer {

using json = nlohmann::json;

namespace {
json error(const std::string& msg) { return {{"status", "error"}, {"message", msg}}; }
}  // namespace

void Agent::count(const std::string& command, const std::string& result) {
  std::lock_guard<std::mutex> g(mu_);
  cni_requests_[{command, result}]++;
}

const std::vector<double>& Agent::Latency::bounds() {
  static const std::vector<double> b = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
  return b;
}

void Agent::Latency::observe(double seconds) {
  size_t i = std::lower_bound(bounds().begin(), bounds().end(), seconds) - bounds().begin();
  counts[i] += 1;
  sum += seconds;
}

std::string Agent::handle_cni(const std::string& line) {
  auto started = std::chrono::steady_clock::now();
  uint64_t serial;
  {
    std::lock_guard<std::mutex> g(mu_);
    serial = ++cni_serial_;
    cni_in_flight_[serial] = started;  // the watchdog's view of the CNI path
  }
  auto req = parse_cni_request(line);
  json out;
  std::string command = req ? req->command : "malformed";
  if (!req) out = error(req.error().message());
  else if (command == "ADD") out = cni_add(req->pod);
  else if (command == "DEL") out = cni_del(req->pod);
  else out = cni_check(req->pod);
  {
    std::lock_guard<std::mutex> g(mu_);
    cni_in_flight_.erase(serial);
  }
  std::string result = out.value("status", "error");
  count(command, result);
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count();
  {
    std::lock_guard<std::mutex> g(mu_);
    cni_latency_[command].observe(double(us) / 1e6);
  }
  if (req)
    spdlog::info("cni {} pod={} container={} -> {} {} ({} us)", command, req->pod.full_name(),
                 req->pod.container_id.substr(0, 12), result, out.value("message", ""), us);
  else
    spdlog::warn("cni: {}", req.error().message());
  return out.dump();
}

Result<bool> Agent::kube_decides(PodInfo& pod) {
  auto kp = kube_source_->pod(pod.uid);
  if (!kp) {
    // Not in the watch cache yet: ask the API, as istio-cni's plugin does. An answer we
    // cannot get is an error, never a guess: the runtime retries ADD.
    auto r = kube_client_->get("/api/v1/namespaces/" + pod.namespace_ + "/pods/" + pod.name);
    if (!r) return Error{"get pod from the API: " + r.error().message(), 0, pod.full_name()};
    auto parsed = kube::parse_pod(*r);
    if (!parsed) return Error{"the API's pod does not parse: " + parsed.error().message(), 0, pod.full_name()};
    if (!pod.uid.empty() && parsed->uid != pod.uid)
      return invalid("the API has another pod of this name (uid " + parsed->uid + "): not yet the one being created",
                     pod.full_name());
    kp = *parsed;
  }
  auto ns_labels = kube_source_->namespace_labels(pod.namespace_);
  if (!ns_labels) {
    auto r = kube_client_->get("/api/v1/namespaces/" + pod.namespace_);
    if (!r) return Error{"get namespace from the API: " + r.error().message(), 0, pod.namespace_};
    auto labels = kube::parse_namespace(*r);
    if (!labels) return Error{"the API's namespace does not parse: " + labels.error().message(), 0, pod.namespace_};
    ns_labels = labels->second;
  }
  pod.service_account = kp->service_account;
  if (pod.uid.empty()) pod.uid = kp->uid;
  take_overrides(pod, *kp);
  return cfg_.label_policy.enrolled(*kp, &*ns_labels);
}

Result<bool> Agent::enrollment(PodInfo& pod) {
  if (!kube_source_) return policy_.enrolled(pod);
  auto r = kube_decides(pod);
  if (!r) return Error{"cannot tell whether the pod is enrolled: " + r.error().message(), 0, "", r.error().code};
  return *r;
}

json Agent::cni_add(PodInfo pod) {
  if (pod.netns.empty() || pod.container_id.empty()) return error("request lacks netns or container_id");
  auto enrolled = enrollment(pod);
  if (!enrolled) return error(enrolled.error().message());
  if (!*enrolled) return {{"status", "not_enrolled"}};
  if (pod.uid.empty() || pod.name.empty() || pod.namespace_.empty())
    return error("an enrolled pod needs K8S_POD_UID, K8S_POD_NAME and K8S_POD_NAMESPACE");
  auto st = capture(pod);
  if (!st) return error(st.error().message());
  kick_kube();
  return {{"status", "captured"}};
}

json Agent::cni_del(const PodInfo& pod) {
  auto st = release(pod, "CNI DEL");
  if (!st) return error(st.error().message());
  kick_kube();
  return {{"status", "ok"}};
}

json Agent::cni_check(PodInfo pod) {
  auto enrolled = enrollment(pod);
  if (!enrolled) return error(enrolled.error().message());
  if (!*enrolled) return {{"status", "ok"}, {"message", "not enrolled"}};
  auto found = pods_.find(pod);
  if (!found) return error("pod should be captured but is not");
  auto full = dp()->pod(found->netns_cookie, Datapath::Detail::Full);
  if (!full) return error(full.error().message());
  auto missing = full->missing();
  if (!missing.empty()) return error("pod is not whole: missing " + fmt::format("{}", fmt::join(missing, ", ")));
  return {{"status", "ok"}, {"message", "captured"}};
}

}  // namespace podsteer
