// Install, adopt and uninstall the node's datapath under the state dir.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>

#include <filesystem>
#include <set>

#include "datapath.h"
#include "datapath_internal.h"
#include "kernel_features.h"
#include "log.h"
#include "socket_hooks.h"
#include "system.h"

namespace podsteer {

using namespace detail;

namespace detail {

uint32_t prog_id_of(int prog_fd) {
  bpf_prog_info info{};
  __u32 len = sizeof(info);
  if (bpf_obj_get_info_by_fd(prog_fd, &info, &len) != 0) return 0;
  return info.id;
}

std::optional<bpf_link_info> pinned_link_info(const std::string& pin) {
  Fd link(bpf_obj_get(pin.c_str()));
  bpf_link_info info{};
  __u32 len = sizeof(info);
  if (!link.valid() || bpf_obj_get_info_by_fd(link.get(), &info, &len) != 0) return std::nullopt;
  return info;
}

uint64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + ts.tv_nsec;
}

}  // namespace detail

void detail::pin_maps_under(bpf_object* obj, const std::string& maps_dir) {
  bpf_map* m;
  bpf_object__for_each_map(m, obj) {
    if (bpf_map__is_internal(m)) continue;  // .rodata is per object, not shared
    std::string pin = join(maps_dir, bpf_map__name(m));
    bpf_map__set_pin_path(m, pin.c_str());
    // A pinned map keeps the memory model it was made with: the tuple maps of an earlier
    // build are not preallocated, and an entry cannot move between the two without a
    // moment in which a live connection's is in neither. libbpf reuses a pin only when
    // the flags match, so this object's definition follows the pin; a reinstall
    // preallocates. Any other difference still refuses the pin.
    int fd = bpf_obj_get(pin.c_str());
    if (fd < 0) continue;
    bpf_map_info info{};
    __u32 len = sizeof(info);
    if (bpf_obj_get_info_by_fd(fd, &info, &len) == 0 &&
        (info.map_flags ^ bpf_map__map_flags(m)) == BPF_F_NO_PREALLOC) {
      spdlog::debug("{}: kept as pinned, {}preallocated", bpf_map__name(m),
                    info.map_flags & BPF_F_NO_PREALLOC ? "not " : "");
      bpf_map__set_map_flags(m, info.map_flags);
    }
    close(fd);
  }
}

Status Datapath::install(const std::string& state_dir, const NodeConfig& want) {
  for (const auto& f : probe_features(state_dir)) {
    if (f.required && !f.ok)
      return invalid(fmt::format("kernel feature missing: {} ({}): {}. Run `podsteer doctor`.", f.name, f.detail, f.why));
  }
  std::string hook = want.hook_cgroup;
  if (hook.empty()) {
    auto d = default_hook_cgroup();
    if (!d) return d.error();
    hook = *d;
  }
  PODSTEER_TRY(check_cgroup2_dir(hook));
  if (hook.size() >= PODSTEER_PATH_LEN) return invalid("hook cgroup path too long", hook);

  podsteer_config cfg = abi_config_of(want, hook);

  bool ok = false;
  PODSTEER_TRY(make_dir(state_dir));
  // Any failure from here removes what was made, so nothing is left half-installed.
  struct Cleanup {
    const std::string& dir;
    bool& ok;
    ~Cleanup() {
      if (!ok) (void)Datapath::remove_all(dir);
    }
  } cleanup{state_dir, ok};
  for (const char* sub : {"maps", "links", "pods"}) PODSTEER_TRY(make_dir(join(state_dir, sub)));

  auto hooks = SocketHooks::load(state_dir, cfg);
  if (!hooks) return hooks.error();
  if (want.proxy_identity == NodeConfig::ProxyIdentity::Mark) {
    auto proxies = Map<__u64, podsteer_proxy>::open(map_pin(state_dir, "podsteer_proxy"));
    if (!proxies) return proxies.error();
    PODSTEER_TRY(proxies->update(PODSTEER_PROXY_ANY, podsteer_proxy{}));
  }
  auto attached = hooks->attach(hook);
  if (!attached) return attached.error();

  // The config entry is written last: it marks the install complete.
  auto cfg_map = Map<__u32, podsteer_config>::open(map_pin(state_dir, "podsteer_config"));
  if (!cfg_map) return cfg_map.error();
  PODSTEER_TRY(cfg_map->update(0, cfg));
  spdlog::info("installed datapath in {} (socket hooks at {})", state_dir, hook);
  ok = true;
  return {};
}

Status Datapath::adopt() {
  auto cfg_map = Map<__u32, podsteer_config>::open(map_pin(state_dir_, "podsteer_config"));
  if (!cfg_map) return cfg_map.error();
  auto cfg = cfg_map->lookup(0);
  if (!cfg) return cfg.error();
  if (!cfg->has_value() || (*cfg)->abi_version == 0)
    return invalid("state dir holds an incomplete install", state_dir_, ErrorCode::kIncompleteInstall);
  config_ = **cfg;
  auto info = map_info(cfg_map->fd());
  if (!info) return info.error();
  config_map_id_ = info->id;
  if (config_.abi_version != PODSTEER_ABI_VERSION)
    return invalid(fmt::format("state dir was made with map ABI {}, this podsteer uses {}; run `podsteer "
                               "uninstall`, then enroll again",
                               config_.abi_version, PODSTEER_ABI_VERSION),
                   state_dir_);
  auto open = [&](auto& slot, const char* name) -> Status {
    using M = typename std::remove_reference_t<decltype(slot)>::value_type;
    auto m = M::open(map_pin(state_dir_, name));
    if (!m) return m.error();
    slot.emplace(std::move(*m));
    return {};
  };
  PODSTEER_TRY(open(pods_, "podsteer_pods"));
  PODSTEER_TRY(open(meta_, "podsteer_meta"));
  PODSTEER_TRY(open(ports_, "podsteer_ports"));
  PODSTEER_TRY(open(cidrs_, "podsteer_cidrs"));
  PODSTEER_TRY(open(stats_, "podsteer_stats"));
  PODSTEER_TRY(open(orig_, "podsteer_orig"));
  PODSTEER_TRY(open(transit_, "podsteer_transi"));
  if (path_exists(map_pin(state_dir_, "podsteer_guard"))) PODSTEER_TRY(open(guard_, "podsteer_guard"));
  if (path_exists(map_pin(state_dir_, "podsteer_holes"))) PODSTEER_TRY(open(holes_, "podsteer_holes"));
  std::string pin = map_pin(state_dir_, "podsteer_listen");
  listeners_ = Fd(bpf_obj_get(pin.c_str()));
  if (!listeners_.valid()) return sys_error("bpf_obj_get", pin);
  return {};
}

Status Datapath::still_installed() const {
  Fd fd(bpf_obj_get(map_pin(state_dir_, "podsteer_config").c_str()));
  auto info = fd.valid() ? map_info(fd.get()) : Result<MapInfo>(sys_error("bpf_obj_get"));
  if (!info || info->id != config_map_id_)
    return invalid("the datapath was uninstalled or replaced by another podsteer process meanwhile; try again",
                   state_dir_, ErrorCode::kReplaced);
  return {};
}

Result<Datapath> Datapath::open(const std::string& state_dir, const NodeConfig& want, bool install_if_missing) {
  PODSTEER_TRY(check_bpffs(state_dir));
  auto lock = StateLock::take(state_dir);
  if (!lock) return lock.error();
  Datapath dp;
  dp.state_dir_ = state_dir;
  if (!want.node_netns.empty()) dp.node_netns_ = want.node_netns;
  dp.tc_mode_ = want.tc_mode;
  bool installed = path_exists(map_pin(state_dir, "podsteer_config"));
  if (installed && is_abi1_state(state_dir)) PODSTEER_TRY(migrate_from_abi1(state_dir));
  else if (installed && is_abi2_state(state_dir)) PODSTEER_TRY(migrate_from_abi2(state_dir));
  if (installed) {
    auto st = dp.adopt();
    if (!st && st.error().is(ErrorCode::kIncompleteInstall) && install_if_missing) {
      spdlog::warn("{}: removing an incomplete install left by an interrupted podsteer", state_dir);
      PODSTEER_TRY(remove_all(state_dir));
      installed = false;
    } else if (!st) {
      return st.error();
    }
  }
  if (!installed) {
    if (!install_if_missing)
      return invalid("no podsteer datapath installed here (enroll a pod first)", state_dir, ErrorCode::kNotFound);
    PODSTEER_TRY(install(state_dir, want));
    PODSTEER_TRY(dp.adopt());
    return dp;
  }
  // Settings that disagree with the state refuse before anything changes (no upgrade either).
  if (!want.hook_cgroup.empty() && want.hook_cgroup != dp.config_.hook_cgroup)
    return invalid(fmt::format("the state dir's socket hooks are at {}, not {}: the hook cgroup is chosen when "
                               "the state dir is made (run `podsteer uninstall` to change it)",
                               dp.config_.hook_cgroup, want.hook_cgroup),
                   state_dir, ErrorCode::kConflict);
  PODSTEER_TRY(check_pinned(dp.config_, want, state_dir));
  if (dp.config_.programs_id != programs_id()) PODSTEER_TRY(dp.upgrade_programs());
  if (want.given & NodeConfig::kProxyIdentity) PODSTEER_TRY(dp.set_proxy_identity(want.proxy_identity));
  return dp;
}

Status Datapath::uninstall(const std::string& state_dir) {
  if (!path_exists(state_dir)) return {};
  PODSTEER_TRY(check_bpffs(state_dir));
  auto lock = StateLock::take(state_dir);
  if (!lock) return lock.error();
  return remove_all(state_dir);
}

// For a state dir this build cannot adopt (another map ABI, a damaged install): the
// return path and cls_bpf filters each pod got, found through whatever of the meta and config maps still
// reads with this build's layouts.
static void clean_netns_best_effort(const std::string& state_dir) {
  podsteer_config cfg{};
  cfg.app_mark = PODSTEER_DEFAULT_APP_MARK;
  cfg.proxy_mark_mask = PODSTEER_DEFAULT_PROXY_MARK_MASK;
  cfg.route_table = PODSTEER_DEFAULT_ROUTE_TABLE;
  cfg.rule_pref = PODSTEER_DEFAULT_RULE_PREF;
  if (auto c = Map<__u32, podsteer_config>::open(map_pin(state_dir, "podsteer_config")); c)
    if (auto v = c->lookup(0); v && v->has_value()) cfg = **v;
  ReturnPath rp{cfg.app_mark, cfg.proxy_mark_mask, cfg.route_table, cfg.rule_pref};
  auto meta = Map<__u64, podsteer_pod_meta>::open(map_pin(state_dir, "podsteer_meta"));
  if (!meta) {
    spdlog::warn("uninstall: pods' meta map does not read ({}): their netns rules are left", meta.error().message());
    return;
  }
  auto keys = meta->keys();
  for (auto cookie : keys ? *keys : std::vector<__u64>{}) {
    auto m = meta->lookup(cookie);
    if (!m || !m->has_value()) continue;
    auto ns = open_netns(str_of((*m)->netns_path, sizeof((*m)->netns_path)));
    if (ns && ns->cookie == cookie) {
      (void)remove_return_path(ns->fd.get(), rp, (*m)->netns_setup, (*m)->fwmark_accept_before);
      detach_node_in_hooks(state_dir, cookie, ns->fd.get());  // cls_bpf filters live in the netns
    }
  }
}

Status Datapath::remove_all(const std::string& state_dir) {
  // Pods first, through the maps if they can be read: their netns rules and sysctl are
  // known only there. Links are pins and go with the tree even if the maps cannot.
  {
    Datapath dp;
    dp.state_dir_ = state_dir;
    auto adopted = dp.adopt();
    if (adopted) {
      auto pods = dp.meta_->keys();
      auto entries = dp.pods_->keys();
      std::set<uint64_t> cookies;
      if (pods) cookies.insert(pods->begin(), pods->end());
      if (entries) cookies.insert(entries->begin(), entries->end());
      for (auto cookie : cookies) {
        auto st = dp.unenroll_locked(cookie);
        if (!st) spdlog::warn("uninstall: pod {}: {}", cookie, st.error().message());
      }
    } else {
      spdlog::warn("uninstall: cannot adopt the pinned state ({}); removing its links and pins regardless",
                   adopted.error().message());
      clean_netns_best_effort(state_dir);
    }
  }
  std::error_code ec;
  for (const char* sub : {"pods", "links"}) SocketHooks::detach_pinned_links(join(state_dir, sub));
  PODSTEER_TRY(remove_tree(state_dir));
  return {};
}

Result<std::vector<CgroupLink>> Datapath::cgroup_links() {
  std::vector<CgroupLink> out;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(join(state_dir_, "links"), ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    CgroupLink l;
    l.program = it->path().filename().string();
    if (auto info = pinned_link_info(it->path().string())) {
      l.link_id = info->id;
      l.prog_id = info->prog_id;
      l.cgroup_id = info->cgroup.cgroup_id;
    }
    out.push_back(l);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.program < b.program; });
  return out;
}

}  // namespace podsteer
