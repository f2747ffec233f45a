// Enroll and unenroll pods: exclusions, the pod's sk_lookup link, its return path, and
// the entries that switch the socket hooks on for its netns.
#include <arpa/inet.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <set>

#include "datapath.h"
#include "datapath_internal.h"
#include "log.h"

namespace podsteer {

using namespace detail;

ReturnPath Datapath::return_path() const {
  return ReturnPath{config_.app_mark, config_.proxy_mark_mask, config_.route_table, config_.rule_pref};
}

Status Datapath::write_exclusions(uint64_t cookie, const PodOptions& opts) {
  __u8 one = 1;
  for (auto p : opts.exclude_inbound_ports)
    PODSTEER_TRY(ports_->update(podsteer_port_key{cookie, p, PODSTEER_DIR_INBOUND, {}}, one));
  for (auto p : opts.exclude_outbound_ports)
    PODSTEER_TRY(ports_->update(podsteer_port_key{cookie, p, PODSTEER_DIR_OUTBOUND, {}}, one));
  for (const auto& c : opts.exclude_outbound_cidrs) PODSTEER_TRY(cidrs_->update(cidr_key(cookie, c), one));
  return {};
}

// Removes the pod's exclusions, except those in keep (used when settings change).
void Datapath::erase_exclusions(uint64_t cookie, const PodOptions* keep) {
  std::set<std::pair<uint16_t, uint8_t>> keep_ports;
  std::set<std::vector<uint8_t>> keep_cidrs;
  if (keep) {
    for (auto p : keep->exclude_inbound_ports) keep_ports.insert({p, PODSTEER_DIR_INBOUND});
    for (auto p : keep->exclude_outbound_ports) keep_ports.insert({p, PODSTEER_DIR_OUTBOUND});
    for (const auto& c : keep->exclude_outbound_cidrs) {
      auto k = cidr_key(cookie, c);
      keep_cidrs.insert(std::vector<uint8_t>((uint8_t*)&k, (uint8_t*)&k + sizeof(k)));
    }
  }
  if (auto keys = ports_->keys(); keys) {
    for (const auto& k : *keys)
      if (k.netns_cookie == cookie && !keep_ports.count({k.port, k.direction})) (void)ports_->erase(k);
  }
  if (auto keys = cidrs_->keys(); keys) {
    for (const auto& k : *keys) {
      std::vector<uint8_t> bytes((uint8_t*)&k, (uint8_t*)&k + sizeof(k));
      if (cookie_of(k) == cookie && !keep_cidrs.count(bytes)) (void)cidrs_->erase(k);
    }
  }
}

// The pod's per-connection entries: the sockets that own them would remove them as they
// close, but an unenrolled pod's sockets may live on for long.
void Datapath::erase_connections(uint64_t cookie) {
  if (auto keys = orig_->keys(); keys)
    for (const auto& k : *keys)
      if (k.netns_cookie == cookie) (void)orig_->erase(k);
  if (auto keys = transit_->keys(); keys)
    for (const auto& k : *keys)
      if (k.netns_cookie == cookie) (void)transit_->erase(k);
  for (uint16_t family : {AF_INET, AF_INET6}) {
    podsteer_listener_key k = listener_key(cookie, config_.inbound_port, family);
    (void)erase_elem(listeners_.get(), &k, "podsteer_listen");
  }
}

// The pod's own addresses, for the outbound target: the first global address of each
// family on its non-loopback interfaces.
static Status pod_addresses(const Netns& ns, podsteer_pod& entry) {
  auto ifaces = list_interfaces(ns.fd.get());
  if (!ifaces) return ifaces.error().in(ns.path);
  for (const auto& i : *ifaces) {
    if (i.loopback) continue;
    if (!(entry.flags & PODSTEER_POD_HAS_IP4) && !i.ip4.empty()) {
      entry.flags |= PODSTEER_POD_HAS_IP4;
      entry.ip4 = i.ip4.front().s_addr;
    }
    if (!(entry.flags & PODSTEER_POD_HAS_IP6) && !i.ip6.empty()) {
      entry.flags |= PODSTEER_POD_HAS_IP6;
      std::memcpy(entry.ip6, &i.ip6.front(), 16);
    }
  }
  return {};
}

static uint64_t netns_ino(const Netns& ns) {
  struct stat st {};
  return fstat(ns.fd.get(), &st) == 0 ? st.st_ino : 0;
}

static void fill_names(podsteer_pod_meta& m, const PodOptions& opts) {
  put_identity(m, opts);
  m.n_excluded_cidrs = opts.exclude_outbound_cidrs.size();
}

Result<EnrollOutcome> Datapath::enroll(const Netns& ns, const PodOptions& opts) {
  auto lock = StateLock::take(state_dir_);
  if (!lock) return lock.error();
  PODSTEER_TRY(still_installed());
  return enroll_locked(ns, opts);
}

Result<EnrollOutcome> Datapath::enroll_locked(const Netns& ns, const PodOptions& opts) {
  auto too_long = [](const std::string& s, size_t cap) { return s.size() >= cap; };
  if (too_long(opts.namespace_, PODSTEER_NAME_LEN) || too_long(opts.name, PODSTEER_NAME_LEN) ||
      too_long(opts.service_account, PODSTEER_NAME_LEN))
    return invalid("pod namespace, name or service account longer than 253 characters", opts.name);
  if (too_long(opts.uid, sizeof(podsteer_pod_meta::uid)) || too_long(opts.container_id, sizeof(podsteer_pod_meta::container_id)))
    return invalid("pod uid or container id too long", opts.name);
  if (ns.path.size() >= PODSTEER_PATH_LEN) return invalid("netns path too long", ns.path);

  podsteer_pod entry{};
  entry.flags = (opts.dns ? PODSTEER_POD_DNS : 0) | (opts.fail_open ? PODSTEER_POD_FAIL_OPEN : 0) |
                (opts.exclude_outbound_ports.empty() ? PODSTEER_POD_NO_OUT_PORTS : 0) |
                (opts.exclude_outbound_cidrs.empty() ? PODSTEER_POD_NO_OUT_CIDRS : 0) |
                (opts.exclude_inbound_ports.empty() ? PODSTEER_POD_NO_IN_PORTS : 0) |
                (opts.bypass_inbound ? PODSTEER_POD_NO_INBOUND : 0);
  PODSTEER_TRY(pod_addresses(ns, entry));
  entry.enrolled_ns = now_ns();
  const uint64_t cookie = ns.cookie;

  auto existing = pods_->lookup(cookie);
  if (!existing) return existing.error();
  if (existing->has_value()) {
    // Re-enroll: settings change in place, missing pieces are put back, connections are
    // untouched.
    auto meta = meta_->lookup(cookie);
    if (!meta) return meta.error();
    podsteer_pod_meta m = meta->has_value() ? **meta : podsteer_pod_meta{};
    podsteer_pod_meta before = m;
    const podsteer_pod& old = **existing;
    entry.enrolled_ns = old.enrolled_ns;
    PODSTEER_TRY(write_exclusions(cookie, opts));
    erase_exclusions(cookie, &opts);
    PODSTEER_TRY(attach_inbound(ns));
    auto made = make_return_path(ns.fd.get(), return_path());
    if (!made) return made.error();
    if (made->setup & PODSTEER_SETUP_FWMARK_ACCEPT) m.fwmark_accept_before = made->fwmark_accept_before;
    m.netns_setup |= made->setup;
    PodOptions names = opts;  // a re-enroll without names keeps the ones it had
    names.fill_from(identity_of(m));
    fill_names(m, names);
    copy_str(m.netns_path, sizeof(m.netns_path), ns.path);
    m.flags = entry.flags & PODSTEER_POD_SETTINGS;
    m.netns_ino = netns_ino(ns);
    bool same = old.flags == entry.flags && old.ip4 == entry.ip4 && !std::memcmp(old.ip6, entry.ip6, 16) &&
                !std::memcmp(&before, &m, sizeof(m)) && made->setup == 0;
    PODSTEER_TRY(meta_->update(cookie, m));
    if (!same) PODSTEER_TRY(pods_->update(cookie, entry));
    return same ? EnrollOutcome::Unchanged : EnrollOutcome::Updated;
  }

  podsteer_pod_meta meta{};
  fill_names(meta, opts);
  copy_str(meta.netns_path, sizeof(meta.netns_path), ns.path);
  meta.flags = entry.flags & PODSTEER_POD_SETTINGS;
  meta.netns_ino = netns_ino(ns);
  Rollback undo;
  undo.add([this, cookie] { erase_exclusions(cookie, nullptr); });
  PODSTEER_TRY(write_exclusions(cookie, opts));
  undo.add([this, cookie] { (void)stats_->erase(cookie); });
  PODSTEER_TRY(stats_->reset(cookie));
  undo.add([this, cookie, fd = ns.fd.get()] { detach_inbound(cookie, fd); });
  PODSTEER_TRY(attach_inbound(ns));
  auto made = make_return_path(ns.fd.get(), return_path());
  if (!made) return made.error();
  meta.netns_setup = made->setup;
  meta.fwmark_accept_before = made->fwmark_accept_before;
  undo.add([this, &ns, setup = made->setup, before = made->fwmark_accept_before] {
    (void)remove_return_path(ns.fd.get(), return_path(), setup, before);
  });
  undo.add([this, cookie] { (void)meta_->erase(cookie); });
  PODSTEER_TRY(meta_->update(cookie, meta));
  PODSTEER_TRY(pods_->update(cookie, entry, BPF_NOEXIST));
  undo.commit();
  return EnrollOutcome::Enrolled;
}

Status Datapath::unenroll(uint64_t cookie) {
  auto lock = StateLock::take(state_dir_);
  if (!lock) return lock.error();
  PODSTEER_TRY(still_installed());
  return unenroll_locked(cookie);
}

Status Datapath::unenroll_locked(uint64_t cookie) {
  auto meta = meta_->lookup(cookie);
  if (!meta) return meta.error();
  auto entry = pods_->lookup(cookie);
  if (!entry) return entry.error();
  if (!meta->has_value() && !entry->has_value())
    return invalid(fmt::format("no pod with netns cookie {} is enrolled", cookie));
  // The pod entry goes first: from then on the hooks leave new connections alone.
  PODSTEER_TRY(pods_->erase(cookie));
  std::optional<Netns> ns;
  if (meta->has_value())
    if (auto r = open_netns(str_of((*meta)->netns_path, sizeof((*meta)->netns_path))); r && r->cookie == cookie)
      ns.emplace(std::move(*r));
  detach_inbound(cookie, ns ? ns->fd.get() : -1);
  if (meta->has_value()) {
    const podsteer_pod_meta& m = **meta;
    if (ns) {
      auto st = remove_return_path(ns->fd.get(), return_path(), m.netns_setup, m.fwmark_accept_before);
      if (!st) spdlog::warn("unenroll {}: return path: {}", cookie, st.error().message());
    }
    // a netns that is gone took its rules with it
  }
  erase_exclusions(cookie, nullptr);
  erase_connections(cookie);
  PODSTEER_TRY(stats_->erase(cookie));
  if (guard_) PODSTEER_TRY(guard_->erase(cookie));
  if (holes_) PODSTEER_TRY(holes_->erase(cookie));
  PODSTEER_TRY(meta_->erase(cookie));
  return {};
}

Result<uint64_t> Datapath::find_pod(const std::string& netns_path) {
  auto keys = meta_->keys();
  if (!keys) return keys.error();
  for (auto cookie : *keys) {
    auto m = meta_->lookup(cookie);
    if (m && m->has_value() && netns_path == str_of((*m)->netns_path, PODSTEER_PATH_LEN)) return cookie;
  }
  // Enrolled under another path to the same namespace (e.g. /proc/PID/ns/net)?
  auto ns = open_netns(netns_path);
  if (ns) {
    auto e = pods_->lookup(ns->cookie);
    if (e && e->has_value()) return ns->cookie;
    auto m = meta_->lookup(ns->cookie);
    if (m && m->has_value()) return ns->cookie;
    return invalid("no pod is enrolled with this network namespace", netns_path);
  }
  return Error{fmt::format("no pod is enrolled with this path, and it does not open as a network namespace ({})",
                           ns.error().message()),
               0, netns_path};
}

}  // namespace podsteer
