// Drift repair (Istio #61182: a pod bypassed the mesh for 29 days because a piece of its
// capture was gone and nothing looked). Every repair_interval_ms the agent checks the
// install (state dir, socket hooks at the hook cgroup) and every captured pod (pod entry,
// sk_lookup link, return path rules, routes and sysctl, its netns), puts back whatever is
// missing, and counts and logs each piece. The pass also refreshes the status cache that
// /metrics reads, so a scrape never opens a pod's netns.
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <set>
#include <unordered_map>

#include "clock.h"
#include "agent.h"
#include "log.h"
#include "netns.h"

namespace podsteer {

namespace {


// The options a captured pod was enrolled with, as its entries record them.
PodOptions options_from_status(const PodStatus& s) {
  PodOptions o;
  o.identity() = s.identity();
  uint32_t flags = s.has_entry ? s.entry.flags : s.meta.flags;
  o.dns = flags & PODSTEER_POD_DNS;
  o.fail_open = flags & PODSTEER_POD_FAIL_OPEN;
  o.bypass_inbound = flags & PODSTEER_POD_NO_INBOUND;
  o.exclude_inbound_ports = s.excluded_inbound_ports;
  o.exclude_outbound_ports = s.excluded_outbound_ports;
  for (const auto& c : s.excluded_cidrs)
    if (auto parsed = parse_cidr(c); parsed) o.exclude_outbound_cidrs.push_back(*parsed);
  return o;
}

}  // namespace

void Agent::count_repair(const std::string& piece, const std::string& pod) {
  spdlog::warn("repair: {}{} was missing and is back", piece, pod.empty() ? "" : " of " + pod);
  std::lock_guard<std::mutex> g(mu_);
  repairs_[piece]++;
}

void Agent::repair_worker() {
  // Background work: a pass looks into every pod's netns (~0.3 ms a pod). At nice 10 it
  // yields to CNI requests and proxy acks, which a pod's start waits for.
  if (setpriority(PRIO_PROCESS, static_cast<id_t>(gettid()), 10) != 0)
    spdlog::debug("repair: setpriority: {}", strerror(errno));
  while (!stopping_) {
    auto t0 = std::chrono::steady_clock::now();
    repair_tick_ms_ = now_ms();
    repair_once();
    repair_pass_us_ = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count();
    repair_passes_++;
    if (!kube_reconciled_ && zds_->connected())
      kick_kube();  // a proxy is here now: the pass that makes the agent ready need not wait for the timer
    std::unique_lock<std::mutex> g(mu_);
    repair_cv_.wait_for(g, std::chrono::milliseconds(cfg_.repair_interval_ms), [this] { return stopping_.load(); });
  }
}

// The table against its projection: a pod in the maps the table lacks was enrolled by
// another process (the CLI, an agent before this one that lost its table): it joins the
// table. A pod in the table whose entries are all gone was unenrolled by someone else: it
// leaves. Each under the pod's lock, checked again there (a capture or release may be
// between its two steps).
bool Agent::sync_table(const std::vector<PodStatus>& listed) {
  auto d = dp();
  std::set<uint64_t> in_maps;
  bool changed = false;
  for (const auto& p : listed) {
    in_maps.insert(p.cookie);
    if (pods_.by_cookie(p.cookie)) continue;
    PodInfo info = pod_from_meta(p);
    auto lock = pod_lock(pod_key(info));
    std::lock_guard<std::mutex> g(*lock);
    if (pods_.by_cookie(p.cookie) || !d->has_pod(p.cookie)) continue;
    pods_.put(info);
    spdlog::info("repair: {} is in the maps but was not in the pod table: taken in", info.full_name());
    changed = true;
  }
  for (const auto& p : pods_.all()) {
    if (in_maps.count(p.netns_cookie)) continue;
    auto lock = pod_lock(pod_key(p));
    std::lock_guard<std::mutex> g(*lock);
    if (d->has_pod(p.netns_cookie)) continue;
    if (pods_.erase(p.netns_cookie)) {
      spdlog::info("repair: {} was unenrolled by another process: dropped from the pod table", p.full_name());
      changed = true;
    }
  }
  return changed;
}

void Agent::repair_once() {
  if (removing_) return;  // the datapath is being taken away on purpose
  finish_istio_takeovers();
  auto d = dp();
  // The install itself: gone (uninstalled under us, bpffs lost) means everything goes
  // back, from what the proxies were told.
  if (!d->check_installed()) {
    auto fresh = Datapath::open(cfg_.state_dir, cfg_.node, true);
    if (!fresh) {
      spdlog::error("repair: cannot reinstall the datapath: {}", fresh.error().message());
      return;
    }
    dp_.store(std::make_shared<Datapath>(std::move(*fresh)));
    d = dp();
    count_repair("datapath install", "");
    for (const auto& pod : pods_.all()) {
      auto st = capture(pod);
      if (!st) spdlog::warn("repair: recapture {}: {}", pod.full_name(), st.error().message());
    }
  }
  sync_proxies();
  for (const auto& name : d->missing_hooks()) {
    auto st = d->repair_hooks();
    if (!st) spdlog::error("repair: socket hooks: {}", st.error().message());
    else count_repair("socket hook " + name, "");
  }

  auto pods = d->pods(Datapath::Detail::Full);
  if (!pods) return;
  bool changed = sync_table(*pods);  // the listing is the status cache unless this pass changed something
  for (auto& p : *pods) {
    auto missing = p.missing();
    if (missing.empty() || p.meta.netns_path[0] == 0) continue;
    changed = true;
    PodInfo info = pod_from_meta(p);
    auto lock = pod_lock(pod_key(info));
    std::unique_lock<std::mutex> g(*lock);
    auto now = d->pod(p.cookie, Datapath::Detail::Full);  // again, under the pod's lock
    if (!now || now->missing().empty()) continue;
    std::string path = now->meta.netns_path;
    if (!now->netns_alive) {
      // the netns decides, not the path: a /proc/PID path dies with its PID while the
      // pod's netns lives on in its other processes
      auto moved = find_netns_by_inode(now->meta.netns_ino, cfg_.proc_root);
      // No path and no process: the runtime deleted it (a CNI DEL we did not see). Its
      // sk_lookup link may still run there, kept alive by the proxies' netns fds: only the
      // DelWorkload that release() sends lets it go.
      if (!moved) {
        auto st = release_locked(info, "its netns is gone");
        if (!st) spdlog::warn("repair: release {}: {}", info.full_name(), st.error().message());
        continue;
      }
      path = *moved;
    }
    auto ns = open_netns(path);
    if (!ns || ns->cookie != p.cookie) continue;
    auto r = d->enroll(*ns, options_from_status(*now));
    if (!r) {
      spdlog::error("repair: {}: {}", now->full_name(), r.error().message());
      continue;
    }
    if (path != std::string(now->meta.netns_path)) count_repair("netns path", now->full_name());
    if (now->netns_alive)  // otherwise missing() says only that the netns moved, counted above
      for (const auto& piece : now->missing()) count_repair(piece, now->full_name());
  }
  auto fresh = changed ? d->pods(Datapath::Detail::Full) : std::move(pods);
  if (fresh) {
    auto seen = std::make_shared<const std::vector<PodStatus>>(std::move(*fresh));
    std::shared_ptr<const std::vector<PodStatus>> before;
    {
      std::lock_guard<std::mutex> g(mu_);
      before = cache_;
      cache_ = seen;
    }
    // an app that tried to pass for the proxy is worth a line in the log, once per new event
    // ... and so is a connection that left a pod unsteered: a hole in the capture
    std::unordered_map<uint64_t, const PodStatus*> had;
    for (const auto& b : *before) had[b.cookie] = &b;
    for (const auto& p : *seen) {
      auto it = had.find(p.cookie);
      podsteer_guard was = it != had.end() ? it->second->guard : podsteer_guard{};
      podsteer_hole hole_was = it != had.end() ? it->second->hole : podsteer_hole{};
      if (p.hole.dropped > hole_was.dropped)
        spdlog::warn("hole: {}: {} TCP connection(s) left the pod without the socket hooks steering them (a process "
                     "outside the hook cgroup {}, or socket hooks detached): stopped at the pod's interface",
                     p.full_name(), p.hole.dropped - hole_was.dropped, d->config().hook_cgroup);
      if (p.hole.passed > hole_was.passed)
        spdlog::info("hole: {}: {} TCP connection(s) left the pod unsteered while its proxy was not listening "
                     "(fail-open: let through)",
                     p.full_name(), p.hole.passed - hole_was.passed);
      if (p.guard.forged_mark > was.forged_mark)
        spdlog::warn("guard: {}: {} connection(s) with the proxy mark by a process not the proxy's (captured)",
                     p.full_name(), p.guard.forged_mark - was.forged_mark);
      if (p.guard.bind_refused > was.bind_refused)
        spdlog::warn("guard: {}: {} bind(s) to a proxy port by a process not the proxy's refused", p.full_name(),
                     p.guard.bind_refused - was.bind_refused);
    }
  }
}

}  // namespace podsteer
