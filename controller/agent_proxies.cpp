// The node proxies trusted with the proxy mark. An app with CAP_NET_RAW can set the mark
// (Linux 5.17+), so the programs trust it only from a process in a cgroup podsteer_proxy
// names; the agent names the cgroup of each ZDS peer (SO_PEERCRED) before telling it any pod,
// and removes it once that process is gone. The entries are pinned: they outlive an agent
// restart, as the proxies' sockets do.
#include <spdlog/spdlog.h>

#include <algorithm>

#include "agent.h"

namespace podsteer {

Result<ProxyProcess> Agent::process_of(uint32_t pid) {
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = proxy_processes_.find(pid);
    if (it != proxy_processes_.end() && still_running(it->second, cfg_.proc_root)) return it->second;
  }
  auto p = proxy_process_of(pid, cfg_.proc_root);
  if (!p) return p.error();
  std::lock_guard<std::mutex> g(mu_);
  for (auto it = proxy_processes_.begin(); it != proxy_processes_.end();)
    it = still_running(it->second, cfg_.proc_root) ? std::next(it) : proxy_processes_.erase(it);
  proxy_processes_[pid] = *p;
  return p;
}

Status Agent::trust_peer(uint32_t pid) {
  auto p = process_of(pid);
  if (!p)
    return p.error().in("cannot tell which process the node proxy is, so its sockets could not be told from an "
                        "app's (--proxy-identity mark trusts the mark alone, as Istio's rules do)");
  auto d = dp();
  PODSTEER_TRY(d->trust_proxy(*p));
  spdlog::info("proxy: pid {} (cgroup {}) may use the proxy mark", p->pid, p->cgroup);
  // A state from before proxy identities trusts the mark alone until a proxy is known;
  // unless the node asked for that explicitly, now its process is what counts.
  if (!(cfg_.node.given & NodeConfig::kProxyIdentity) && cfg_.node.proxy_identity == NodeConfig::ProxyIdentity::Process &&
      d->proxy_identity() == NodeConfig::ProxyIdentity::Mark) {
    PODSTEER_TRY(d->set_proxy_identity(NodeConfig::ProxyIdentity::Process));
    spdlog::info("proxy: the proxy mark is trusted from the node proxies' processes only from now on");
  }
  return {};
}

void Agent::sync_proxies() {
  auto d = dp();
  auto have = d->proxies();
  if (!have) {
    spdlog::warn("proxy: {}", have.error().message());
    return;
  }
  std::vector<ProxyProcess> peers;
  for (auto pid : zds_->peer_pids())
    if (auto p = process_of(pid); p) peers.push_back(*p);
  auto in_cgroup = [](const std::vector<ProxyProcess>& v, uint64_t id) {
    return std::find_if(v.begin(), v.end(), [&](const ProxyProcess& p) { return p.cgroup_id == id; });
  };
  for (const auto& p : peers)
    if (in_cgroup(*have, p.cgroup_id) == have->end()) {
      if (auto st = d->trust_proxy(p); !st) spdlog::error("proxy: {}", st.error().message());
      else count_repair("proxy identity", "");
    }
  for (const auto& e : *have) {
    if (still_running(e, cfg_.proc_root)) continue;
    if (auto heir = in_cgroup(peers, e.cgroup_id); heir != peers.end()) {
      (void)d->trust_proxy(*heir);  // another live proxy in that cgroup keeps it trusted
      continue;
    }
    if (auto st = d->forget_proxy(e.cgroup_id); !st) {
      spdlog::error("proxy: {}", st.error().message());
      continue;
    }
    spdlog::info("proxy: pid {} is gone: its cgroup (id {}) may no longer use the proxy mark", e.pid, e.cgroup_id);
  }
}

}  // namespace podsteer
