// Upgrade in place: a podsteer whose programs differ from the pinned ones (a newer build)
// replaces them link by link with bpf_link_update. The links stay where they are: no pod
// is detached for a moment, and established connections never notice.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "datapath.h"
#include "datapath_internal.h"
#include "log.h"
#include "podsteer_lookup.skel.h"
#include "podsteer_sock.skel.h"
#include "socket_hooks.h"
#include "system.h"

namespace podsteer {

using namespace detail;

namespace {

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace

uint64_t programs_id() {
  static const uint64_t id = [] {
    uint64_t h = 0xcbf29ce484222325ull;
    size_t n = 0;
    const void* sock = podsteer_sock__elf_bytes(&n);
    h = fnv1a(h, sock, n);
    const void* lookup = podsteer_lookup__elf_bytes(&n);
    return fnv1a(h, lookup, n);
  }();
  return id;
}

std::vector<std::string> Datapath::missing_hooks() { return SocketHooks::missing(state_dir_, config_.hook_cgroup); }

Status Datapath::repair_hooks() {
  auto lock = StateLock::take(state_dir_);
  if (!lock) return lock.error();
  PODSTEER_TRY(still_installed());
  auto missing = missing_hooks();
  if (missing.empty()) return {};
  auto hooks = SocketHooks::load(state_dir_, config_);
  if (!hooks) return hooks.error();
  auto made = hooks->attach(config_.hook_cgroup, missing);
  if (!made) return made.error();
  return {};
}

Status Datapath::upgrade_programs() {
  // A state from before podsteer_proxy: its programs trusted the mark alone, and so do these
  // until the agent has a proxy to trust (or --proxy-identity process is given)
  bool had_proxies = path_exists(map_pin(state_dir_, "podsteer_proxy"));
  auto hooks = SocketHooks::load(state_dir_, config_);
  if (!hooks) return hooks.error();
  if (!had_proxies) PODSTEER_TRY(set_proxy_identity(NodeConfig::ProxyIdentity::Mark));
  if (!guard_) {
    auto g = PercpuMap<__u64, podsteer_guard>::open(map_pin(state_dir_, "podsteer_guard"));
    if (!g) return g.error();
    guard_.emplace(std::move(*g));
  }
  if (!holes_) {
    auto h = Map<__u64, podsteer_hole>::open(map_pin(state_dir_, "podsteer_holes"));
    if (!h) return h.error();
    holes_.emplace(std::move(*h));
  }
  auto made = hooks->attach(config_.hook_cgroup);
  if (!made) return made.error();
  auto gone = hooks->drop_stale_links();
  size_t pods = 0;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(join(state_dir_, "pods"), ec)) {
    uint64_t cookie = std::stoull(e.path().filename().string());
    PODSTEER_TRY(upgrade_inbound(cookie));
    ++pods;
  }
  config_.programs_id = programs_id();
  auto cfg = Map<__u32, podsteer_config>::open(map_pin(state_dir_, "podsteer_config"));
  if (!cfg) return cfg.error();
  PODSTEER_TRY(cfg->update(0, config_));
  size_t n = SocketHooks::names().size();
  if (gone.empty())
    spdlog::info("upgraded the programs in place: {} socket hooks ({} attached anew), {} pod(s); no link was detached",
                 n, *made, pods);
  else
    spdlog::info("upgraded the programs in place: {} socket hooks ({} attached anew), {} pod(s); detached only what "
                 "this build no longer has: {}",
                 n, *made, pods, fmt::join(gone, ", "));
  return {};
}

}  // namespace podsteer
