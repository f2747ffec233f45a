// Migration of a state dir made by map ABI 1 (inbound by TC, the layouts in
// podsteer_abi_v1.h) to this ABI, without a moment in which a pod is uncaptured:
//
//   1. the new install is made next to the old one (<state dir>-migrating): both sets of
//      socket hooks run at the hook cgroup, the old first, and the new ones leave alone
//      what the old ones already redirected (it goes to the pod's own address);
//   2. each pod of the old state is enrolled into the new, with its names, flags and
//      exclusions: sk_lookup and TC both steer inbound to the proxy meanwhile;
//   3. the old TC attachments, links, programs and pins go;
//   4. the new install takes the state dir's name.
//
// Established connections are untouched throughout; an application that asks
// getpeername() again on a connection made before the migration sees the proxy's address.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <stdio.h>

#include <filesystem>

#include "datapath.h"
#include "datapath_internal.h"
#include "socket_hooks.h"
#include "log.h"
#include "podsteer_abi_v1.h"
#include "system.h"

namespace podsteer {

using namespace detail;

namespace {

struct PodV1 {
  uint64_t cookie = 0;
  podsteer_pod entry{};
  podsteer_pod_meta_v1 meta{};
  PodOptions opts{};
};

Result<std::vector<PodV1>> read_v1_pods(const std::string& state_dir) {
  auto pods = Map<__u64, podsteer_pod>::open(map_pin(state_dir, "podsteer_pods"));
  if (!pods) return pods.error();
  auto meta = Map<__u64, podsteer_pod_meta_v1>::open(map_pin(state_dir, "podsteer_meta"));
  if (!meta) return meta.error();
  auto ports = Map<podsteer_port_key, __u8>::open(map_pin(state_dir, "podsteer_ports"));
  if (!ports) return ports.error();
  auto cidrs = Map<podsteer_cidr_key, __u8>::open(map_pin(state_dir, "podsteer_cidrs"));
  if (!cidrs) return cidrs.error();
  auto keys = meta->keys();
  if (!keys) return keys.error();
  auto port_keys = ports->keys();
  auto cidr_keys = cidrs->keys();
  std::vector<PodV1> out;
  for (auto cookie : *keys) {
    PodV1 p;
    p.cookie = cookie;
    auto m = meta->lookup(cookie);
    auto e = pods->lookup(cookie);
    if (!m || !m->has_value() || !e || !e->has_value()) continue;  // half-removed: nothing to carry over
    p.meta = **m;
    p.entry = **e;
    std::string full = str_of(p.meta.pod, sizeof(p.meta.pod));
    if (auto slash = full.find('/'); slash != std::string::npos) {
      p.opts.namespace_ = full.substr(0, slash);
      p.opts.name = full.substr(slash + 1);
    }
    p.opts.uid = str_of(p.meta.uid, sizeof(p.meta.uid));
    p.opts.service_account = str_of(p.meta.service_account, sizeof(p.meta.service_account));
    p.opts.container_id = str_of(p.meta.container_id, sizeof(p.meta.container_id));
    p.opts.dns = p.entry.flags & PODSTEER_POD_DNS;
    p.opts.fail_open = p.entry.flags & PODSTEER_POD_FAIL_OPEN;
    for (const auto& k : port_keys ? *port_keys : std::vector<podsteer_port_key>{}) {
      if (k.netns_cookie != cookie) continue;
      (k.direction == PODSTEER_DIR_INBOUND ? p.opts.exclude_inbound_ports : p.opts.exclude_outbound_ports).push_back(k.port);
    }
    for (const auto& k : cidr_keys ? *cidr_keys : std::vector<podsteer_cidr_key>{}) {
      if (cookie_of(k) != cookie) continue;
      Cidr c;
      std::memcpy(c.addr, k.addr, 16);
      c.prefix = k.prefixlen - PODSTEER_CIDR_COOKIE_BITS;
      p.opts.exclude_outbound_cidrs.push_back(c);
    }
    out.push_back(std::move(p));
  }
  return out;
}

// The old TC program of one pod: tcx links are pins (they go with the tree); clsact
// filters live in the pod's netns and are removed when they still run the old program.
void detach_v1_tc(const PodV1& p, uint32_t old_tc_prog_id) {
  if (p.meta.attach_mode != PODSTEER_V1_ATTACH_CLSACT) return;
  auto ns = open_netns(str_of(p.meta.netns_path, sizeof(p.meta.netns_path)));
  if (!ns || ns->cookie != p.cookie) return;
  (void)in_netns(ns->fd.get(), [&]() -> Status {
    for (size_t i = 0; i < p.meta.n_ifaces && i < PODSTEER_V1_MAX_IFACES; ++i) {
      bpf_tc_hook hook{};
      hook.sz = sizeof(hook);
      hook.ifindex = p.meta.ifindex[i];
      hook.attach_point = BPF_TC_INGRESS;
      bpf_tc_opts opts{};
      opts.sz = sizeof(opts);
      opts.handle = p.meta.tc_handle[i];
      opts.priority = p.meta.tc_prio[i];
      if (bpf_tc_query(&hook, &opts) != 0 || opts.prog_id != old_tc_prog_id) continue;
      bpf_tc_opts del{};
      del.sz = sizeof(del);
      del.handle = p.meta.tc_handle[i];
      del.priority = p.meta.tc_prio[i];
      (void)bpf_tc_detach(&hook, &del);
    }
    return {};
  });
}

}  // namespace

// The ABI the pinned config says, read with the layout Config has (a config of another
// value size is not that layout: 0)
namespace {
template <class Config>
__u32 pinned_abi(const std::string& state_dir) {
  Fd fd(bpf_obj_get(map_pin(state_dir, "podsteer_config").c_str()));
  auto info = fd.valid() ? map_info(fd.get()) : Result<MapInfo>(invalid("no config"));
  if (!info || info->value_size != sizeof(Config)) return 0;
  Config c{};
  __u32 zero = 0;
  return bpf_map_lookup_elem(fd.get(), &zero, &c) == 0 ? c.abi_version : 0;
}
}  // namespace

// Is the state dir one map ABI 1 made? Its config map has ABI 1's value size.
bool is_abi1_state(const std::string& state_dir) { return pinned_abi<podsteer_config_v1>(state_dir) == 1; }

Status Datapath::migrate_from_abi1(const std::string& state_dir) {
  auto cfg_map = Map<__u32, podsteer_config_v1>::open(map_pin(state_dir, "podsteer_config"));
  if (!cfg_map) return cfg_map.error();
  auto old_cfg = cfg_map->lookup(0);
  if (!old_cfg || !old_cfg->has_value()) return invalid("the ABI 1 state has no config", state_dir);
  const podsteer_config_v1& c1 = **old_cfg;
  auto pods = read_v1_pods(state_dir);
  if (!pods) return pods.error();
  NodeConfig node;
  copy_ports_and_marks(node, c1);
  node.hook_cgroup = str_of(c1.hook_cgroup, sizeof(c1.hook_cgroup));

  std::string staging = state_dir + "-migrating";  // bpffs names may not contain dots
  if (path_exists(staging)) PODSTEER_TRY(remove_all(staging));  // an interrupted migration
  PODSTEER_TRY(install(staging, node));
  Datapath next;
  next.state_dir_ = staging;
  PODSTEER_TRY(next.adopt());
  size_t moved = 0;
  for (const auto& p : *pods) {
    auto ns = open_netns(str_of(p.meta.netns_path, sizeof(p.meta.netns_path)));
    if (!ns || ns->cookie != p.cookie) continue;  // its pod is gone
    auto r = next.enroll_locked(*ns, p.opts);
    if (!r) {
      (void)remove_all(staging);
      return Error{"migrate pod " + p.opts.namespace_ + "/" + p.opts.name + ": " + r.error().message(), 0, state_dir};
    }
    (void)next.find_listeners(*ns);
    ++moved;
  }

  // the old datapath goes: TC first, then every link and pin
  Fd old_tc(bpf_obj_get(join(join(state_dir, "progs"), "tc_ingress").c_str()));
  uint32_t old_tc_id = old_tc.valid() ? prog_id_of(old_tc.get()) : 0;
  for (const auto& p : *pods) detach_v1_tc(p, old_tc_id);
  for (const char* sub : {"pods", "links"}) SocketHooks::detach_pinned_links(join(state_dir, sub));
  PODSTEER_TRY(remove_tree(state_dir));
  if (rename(staging.c_str(), state_dir.c_str()) != 0) return sys_error("rename", staging);
  spdlog::info("migrated {} pod(s) from map ABI 1 to {} in place: inbound now by sk_lookup, no pod was uncaptured",
               moved, PODSTEER_ABI_VERSION);
  return {};
}

// Is the state dir one map ABI 2 made? Its config has this build's layout and says 2.
bool is_abi2_state(const std::string& state_dir) { return pinned_abi<podsteer_config>(state_dir) == 2; }

// ABI 3 changed no layout: two maps whose names were longer than the kernel keeps got the
// names it had given them. Renaming their pins (rename(2) on bpffs, under the state lock)
// keeps the maps themselves, so every entry, and every connection that needs one, lives
// on; the programs still pinned hold the maps, not the paths, and the upgrade that follows
// loads this build's programs onto the renamed pins. The config's ABI is written last, so
// an interrupted migration is finished by the next open.
Status Datapath::migrate_from_abi2(const std::string& state_dir) {
  size_t renamed = 0;
  for (const auto& [was, now] : {std::pair{PODSTEER_ABI2_LISTENERS_PIN, "podsteer_listen"},
                                 std::pair{PODSTEER_ABI2_TRANSIT_PIN, "podsteer_transi"}}) {
    std::string from = map_pin(state_dir, was), to = map_pin(state_dir, now);
    bool have_old = path_exists(from), have_new = path_exists(to);
    if (have_old && have_new)
      return invalid(fmt::format("both {} and {} are pinned: not a state this or an earlier podsteer made", was, now),
                     state_dir);
    if (!have_old && !have_new) return invalid(fmt::format("neither {} nor {} is pinned", was, now), state_dir);
    if (have_old) {
      if (rename(from.c_str(), to.c_str()) != 0) return sys_error("rename", from);
      ++renamed;
    }
  }
  auto cfg_map = Map<__u32, podsteer_config>::open(map_pin(state_dir, "podsteer_config"));
  if (!cfg_map) return cfg_map.error();
  auto cfg = cfg_map->lookup(0);
  if (!cfg) return cfg.error();
  if (!cfg->has_value()) return invalid("the ABI 2 state has no config", state_dir);
  podsteer_config c = **cfg;
  c.abi_version = PODSTEER_ABI_VERSION;
  PODSTEER_TRY(cfg_map->update(0, c));
  spdlog::info("migrated {} from map ABI 2 to 3 in place: {} pin(s) renamed to the names the kernel gives the maps "
               "(podsteer_listen, podsteer_transi), the maps and every connection kept",
               state_dir, renamed);
  return {};
}

}  // namespace podsteer
