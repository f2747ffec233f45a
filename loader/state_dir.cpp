#include "state_dir.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>

#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "datapath.h"
#include "datapath_internal.h"

namespace podsteer {

std::string map_pin(const std::string& state_dir, const std::string& name) { return join(join(state_dir, "maps"), name); }

Status make_dir(const std::string& p) {
  if (mkdir(p.c_str(), 0700) != 0 && errno != EEXIST) return sys_error("mkdir", p);
  return {};
}

Result<StateLock> StateLock::take(const std::string& state_dir) {
  std::string parent = std::filesystem::path(state_dir).parent_path().string();
  Fd fd(::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd.valid()) return sys_error("open", parent);
  if (flock(fd.get(), LOCK_EX) != 0) return sys_error("flock", parent);
  return StateLock(std::move(fd));
}

podsteer_config abi_config_of(const NodeConfig& node, const std::string& hook_cgroup) {
  podsteer_config c{};
  c.abi_version = PODSTEER_ABI_VERSION;
  copy_ports_and_marks(c, node);
  c.app_mark = node.app_mark;
  c.route_table = node.route_table;
  c.rule_pref = node.rule_pref;
  c.programs_id = programs_id();
  std::memset(c.hook_cgroup, 0, sizeof(c.hook_cgroup));
  std::memcpy(c.hook_cgroup, hook_cgroup.data(), std::min(sizeof(c.hook_cgroup) - 1, hook_cgroup.size()));
  return c;
}

NodeConfig node_config_of(const podsteer_config& c) {
  NodeConfig n;
  copy_ports_and_marks(n, c);
  n.app_mark = c.app_mark;
  n.route_table = c.route_table;
  n.rule_pref = c.rule_pref;
  n.hook_cgroup = std::string(c.hook_cgroup, strnlen(c.hook_cgroup, sizeof(c.hook_cgroup)));
  return n;
}

PodIdentity identity_of(const podsteer_pod_meta& m) {
  using detail::str_of;
  PodIdentity id;
  id.uid = str_of(m.uid, sizeof(m.uid));
  id.namespace_ = str_of(m.namespace_, sizeof(m.namespace_));
  id.name = str_of(m.name, sizeof(m.name));
  id.service_account = str_of(m.service_account, sizeof(m.service_account));
  id.container_id = str_of(m.container_id, sizeof(m.container_id));
  return id;
}

void put_identity(podsteer_pod_meta& m, const PodIdentity& id) {
  using detail::copy_str;
  copy_str(m.namespace_, sizeof(m.namespace_), id.namespace_);
  copy_str(m.name, sizeof(m.name), id.name);
  copy_str(m.uid, sizeof(m.uid), id.uid);
  copy_str(m.service_account, sizeof(m.service_account), id.service_account);
  copy_str(m.container_id, sizeof(m.container_id), id.container_id);
}

Status check_pinned(const podsteer_config& pinned, const NodeConfig& want, const std::string& state_dir) {
  NodeConfig have = node_config_of(pinned);
  struct Field {
    NodeConfig::Setting bit;
    const char* flag;
    uint64_t want, have;
    bool hex;
  };
  const Field fields[] = {
      {NodeConfig::kOutboundPort, "--outbound-port", want.outbound_port, have.outbound_port, false},
      {NodeConfig::kInboundPort, "--inbound-port", want.inbound_port, have.inbound_port, false},
      {NodeConfig::kHbonePort, "--hbone-port", want.hbone_port, have.hbone_port, false},
      {NodeConfig::kDnsPort, "--dns-port", want.dns_port, have.dns_port, false},
      {NodeConfig::kProxyMark, "--proxy-mark", want.proxy_mark, have.proxy_mark, true},
      {NodeConfig::kProxyMarkMask, "--proxy-mark-mask", want.proxy_mark_mask, have.proxy_mark_mask, true},
      {NodeConfig::kAppMark, "--app-mark", want.app_mark, have.app_mark, true},
      {NodeConfig::kRouteTable, "--route-table", want.route_table, have.route_table, false},
      {NodeConfig::kRulePref, "--rule-pref", want.rule_pref, have.rule_pref, false},
  };
  for (const auto& f : fields) {
    if (!(want.given & f.bit) || f.want == f.have) continue;
    auto text = [&](uint64_t v) { return f.hex ? fmt::format("{:#x}", v) : std::to_string(v); };
    return Error{fmt::format("the state was made with {} {}, not {}: ports and marks are chosen when the state "
                             "dir is made; give {} {} (or drop the flag), or run `podsteer uninstall` to change it",
                             f.flag, text(f.have), text(f.want), f.flag, text(f.have)),
                 0, state_dir, ErrorCode::kConflict};
  }
  return {};
}

podsteer_cidr_key cidr_key(uint64_t cookie, const Cidr& c) {
  podsteer_cidr_key k{};
  k.prefixlen = PODSTEER_CIDR_COOKIE_BITS + c.prefix;
  k.netns_cookie_hi = htonl(uint32_t(cookie >> 32));
  k.netns_cookie_lo = htonl(uint32_t(cookie));
  std::memcpy(k.addr, c.addr, 16);
  return k;
}

uint64_t cookie_of(const podsteer_cidr_key& k) {
  return (uint64_t(ntohl(k.netns_cookie_hi)) << 32) | ntohl(k.netns_cookie_lo);
}

podsteer_listener_key listener_key(uint64_t cookie, uint16_t port, uint16_t family) {
  podsteer_listener_key k{};
  k.netns_cookie = cookie;
  k.port = port;
  k.family = family;
  return k;
}

}  // namespace podsteer
