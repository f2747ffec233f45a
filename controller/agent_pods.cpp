// Capture and release of one pod: the datapath and the node proxies, in that order, one
// operation per pod at a time.
#include <arpa/inet.h>

#include <chrono>

#include "agent.h"
#include "log.h"
#include "netns.h"

namespace podsteer {

std::string Agent::pod_key(const PodInfo& pod) {
  if (!pod.uid.empty()) return "uid:" + pod.uid;
  if (!pod.container_id.empty()) return "ctr:" + pod.container_id;
  return "netns:" + pod.netns;
}

std::shared_ptr<std::mutex> Agent::pod_lock(const std::string& key) {
  std::lock_guard<std::mutex> g(pod_locks_mu_);
  auto& weak = pod_locks_[key];
  auto lock = weak.lock();
  if (!lock) {
    lock = std::make_shared<std::mutex>();
    weak = lock;
  }
  for (auto it = pod_locks_.begin(); it != pod_locks_.end();)  // keep the map small
    it = it->second.expired() && it->first != key ? pod_locks_.erase(it) : std::next(it);
  return lock;
}

std::shared_ptr<Datapath> Agent::dp() {
  return dp_.load();
}

PodInfo Agent::pod_from_meta(const PodStatus& s) {
  PodInfo p;
  p.identity() = s.identity();
  p.netns = s.meta.netns_path;
  p.netns_cookie = s.cookie;
  // the settings it was enrolled with, and its addresses (for the table's index)
  p.dns = (s.meta.flags & PODSTEER_POD_DNS) != 0;
  p.bypass_inbound = (s.meta.flags & PODSTEER_POD_NO_INBOUND) != 0;
  char buf[INET6_ADDRSTRLEN];
  if ((s.entry.flags & PODSTEER_POD_HAS_IP4) && inet_ntop(AF_INET, &s.entry.ip4, buf, sizeof(buf))) p.ips.push_back(buf);
  if ((s.entry.flags & PODSTEER_POD_HAS_IP6) && inet_ntop(AF_INET6, s.entry.ip6, buf, sizeof(buf))) p.ips.push_back(buf);
  return p;
}

void Agent::take_overrides(PodInfo& info, const kube::Pod& pod) {
  std::vector<std::string> ignored;
  auto o = kube::pod_overrides(pod, &ignored);
  for (const auto& w : ignored) spdlog::warn("kube: {}/{}: {}: ignored", pod.namespace_, pod.name, w);
  info.dns = o.dns;
  info.bypass_inbound = o.bypass_inbound;
}

PodOptions Agent::options_for(const PodInfo& pod) const {
  PodOptions o;
  o.identity() = pod.identity();
  if (o.service_account.empty()) o.service_account = "default";
  o.dns = pod.dns.value_or(cfg_.dns);
  o.fail_open = cfg_.fail_open;
  o.bypass_inbound = pod.bypass_inbound;
  return o;
}

Status Agent::capture(const PodInfo& in, bool proxy_may_be_away) {
  auto lock = pod_lock(pod_key(in));
  std::lock_guard<std::mutex> g(*lock);
  if (removing_) return invalid("podsteer is being removed from this node: not capturing", in.full_name());
  auto ns = open_netns(in.netns);
  if (!ns) return ns.error();
  PodInfo pod = in;
  pod.netns_cookie = ns->cookie;
  if (pod.service_account.empty()) pod.service_account = "default";
  auto d = dp();
  auto t0 = std::chrono::steady_clock::now();
  auto r = d->enroll(*ns, options_for(pod));
  if (!r) return r.error();
  auto t1 = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> g(mu_);
    enroll_latency_.observe(std::chrono::duration<double>(t1 - t0).count());
  }
  // the proxy serving an Istio-captured pod listens there already: sock_ops saw no listen()
  if (proxy_may_be_away)
    if (auto fl = d->find_listeners(*ns); !fl) spdlog::warn("{}: the proxy's listeners: {}", pod.full_name(), fl.error().message());
  if (proxy_may_be_away && !zds_->connected()) {
    // A pod istio-cni captured: the proxy that served it then still does, and the
    // first snapshot a proxy gets from us names it (held until the first Kubernetes pass, 3 s at most)
    zds_->upsert(pod);
    pods_.put(pod);
    spdlog::info("captured {} (netns {}, uid {}; no proxy connected yet: named in the next snapshot)", pod.full_name(),
                 pod.netns, pod.uid);
    return {};
  }
  auto st = zds_->add(pod, ns->fd.get());
  auto us = [](auto a, auto b) { return std::chrono::duration_cast<std::chrono::microseconds>(b - a).count(); };
  if (!st) {
    // Not captured with the proxy's ack: undo, so a retry starts clean and the app never
    // runs half-captured.
    if (*r == EnrollOutcome::Enrolled) {
      (void)d->unenroll(ns->cookie);
      pods_.erase(ns->cookie);  // the repair pass may have seen the entry meanwhile
    }
    return Error{"node proxy did not take the pod: " + st.error().message(), 0, pod.full_name()};
  }
  pods_.put(pod);
  // The proxy acks once its listeners are bound. One marked only after listen() (ztunnel with
  // INPOD_PORT_REUSE=false) was not seen by sock_ops' listen callback: the iterator finds it
  // (when the listener is known already, this is one map lookup).
  if (auto fl = d->find_listeners(*ns); !fl)
    spdlog::warn("{}: the proxy's inbound listener: {}", pod.full_name(), fl.error().message());
  spdlog::info("captured {} (netns {}, uid {}, service account {}; enroll {} us, proxy ack {} us)", pod.full_name(),
               pod.netns, pod.uid, pod.service_account, us(t0, t1), us(t1, std::chrono::steady_clock::now()));
  return {};
}

Status Agent::release(const PodInfo& pod, const std::string& why) {
  auto lock = pod_lock(pod_key(pod));
  std::lock_guard<std::mutex> g(*lock);
  return release_locked(pod, why);
}

Status Agent::release_locked(const PodInfo& pod, const std::string& why) {
  auto found = pods_.find(pod);
  if (!found) return {};  // already released: idempotent
  if (!found->uid.empty()) zds_->remove(found->uid);  // DelWorkload to every proxy
  auto st = dp()->unenroll(found->netns_cookie);
  if (!st) return st;
  pods_.erase(found->netns_cookie);
  spdlog::info("released {} ({})", found->full_name(), why);
  return {};
}

// The DaemonSet is gone: every pod goes back to direct traffic, the proxies are told, the
// annotation istiod reads is taken off (a pod still marked would get HBONE it can no longer
// take), and the datapath leaves the node. Nothing captures again meanwhile (removing_
// stops capture(), the repair pass and the Kubernetes pass).
Status Agent::remove_from_node() {
  removing_ = true;
  for (const auto& p : pods_.all())
    if (auto st = release(p, "podsteer is being removed from the node"); !st)
      spdlog::warn("release {}: {}", p.full_name(), st.error().message());
  if (kube_source_)
    for (const auto& [uid, pod] : kube_source_->snapshot().pods)
      if (pod.annotations.count(kube::kRedirectionAnnotation)) annotate(pod, false);
  auto st = Datapath::uninstall(cfg_.state_dir);
  if (st) spdlog::info("the datapath is removed from this node ({})", cfg_.state_dir);
  return st;
}

}  // namespace podsteer
