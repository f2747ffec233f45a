// What is there: each pod's entries, counters, sk_lookup link and netns setup.
#include <arpa/inet.h>

#include <algorithm>
#include <set>

#include "datapath.h"
#include "datapath_internal.h"

namespace podsteer {

using namespace detail;

PodIdentity PodStatus::identity() const { return identity_of(meta); }

std::vector<std::string> PodStatus::missing() const {
  std::vector<std::string> out;
  if (!netns_alive) {
    out.push_back("network namespace (gone)");
    return out;
  }
  if (!has_entry) out.push_back("pod entry (podsteer_pods)");
  if (!inbound.link_id) out.push_back("sk_lookup link");
  else if (!inbound.attached) out.push_back("sk_lookup link attached to the pod's netns");
  for (unsigned ifindex : inbound.node_in_missing) out.push_back(fmt::format("tc ingress on ifindex {}", ifindex));
  for (unsigned ifindex : inbound.pod_out_missing) out.push_back(fmt::format("tc egress on ifindex {}", ifindex));
  for (const auto& m : return_path.missing()) out.push_back(m);
  return out;
}

Result<PodStatus> Datapath::status_of(uint64_t cookie, Detail detail, const ExclusionKeys& keys) {
  PodStatus s;
  s.cookie = cookie;
  if (auto e = pods_->lookup(cookie); e && e->has_value()) {
    s.has_entry = true;
    s.entry = **e;
  }
  if (auto m = meta_->lookup(cookie); m && m->has_value()) s.meta = **m;
  if (auto c = stats_->lookup(cookie); c && c->has_value()) {
    for (const auto& cpu : **c) {
      s.counters.redirected_out += cpu.redirected_out;
      s.counters.redirected_in += cpu.redirected_in;
      s.counters.dns_redirected += cpu.dns_redirected;
      s.counters.bypassed += cpu.bypassed;
      s.counters.proxy_missing += cpu.proxy_missing;
    }
  }
  // made by the programs at a pod's first guard event
  if (guard_)
    if (auto row = guard_->lookup(cookie); row && row->has_value())
      for (const auto& cpu : **row) {
        s.guard.forged_mark += cpu.forged_mark;
        s.guard.bind_refused += cpu.bind_refused;
      }
  // made by the pod's TC egress program at its first event
  if (holes_)
    if (auto row = holes_->lookup(cookie); row && row->has_value()) s.hole = **row;
  std::optional<Netns> ns;
  if (s.meta.netns_path[0]) {
    auto r = open_netns(str_of(s.meta.netns_path, sizeof(s.meta.netns_path)));
    if (r && r->cookie == cookie) {
      s.netns_alive = true;
      ns.emplace(std::move(*r));
    }
  }
  s.inbound = inbound_status(cookie, ns ? &*ns : nullptr);
  for (const auto& k : keys.ports) {
    if (k.netns_cookie != cookie) continue;
    (k.direction == PODSTEER_DIR_INBOUND ? s.excluded_inbound_ports : s.excluded_outbound_ports).push_back(k.port);
  }
  std::sort(s.excluded_inbound_ports.begin(), s.excluded_inbound_ports.end());
  std::sort(s.excluded_outbound_ports.begin(), s.excluded_outbound_ports.end());
  for (const auto& k : keys.cidrs) {
    if (cookie_of(k) != cookie) continue;
    unsigned plen = k.prefixlen - PODSTEER_CIDR_COOKIE_BITS;
    in6_addr a6;
    std::memcpy(&a6, k.addr, 16);
    bool v4 = IN6_IS_ADDR_V4MAPPED(&a6) && plen >= 96;
    s.excluded_cidrs.push_back(fmt::format("{}/{}", format_ip16(k.addr), v4 ? plen - 96 : plen));
  }
  std::sort(s.excluded_cidrs.begin(), s.excluded_cidrs.end());
  if (detail == Detail::Full && ns) {
    auto rp = read_return_path(ns->fd.get(), return_path());
    if (rp) s.return_path = *rp;
    if (auto ifaces = list_interfaces(ns->fd.get()); ifaces) {
      for (const auto& i : *ifaces) {
        if (i.loopback) continue;
        for (const auto& a : i.ip4) s.addresses.push_back(format_ip(a));
        for (const auto& a : i.ip6) s.addresses.push_back(format_ip(a));
      }
    }
  }
  return s;
}

Result<std::vector<PodStatus>> Datapath::pods(Detail detail) {
  std::set<uint64_t> cookies;
  auto a = meta_->keys();
  if (!a) return a.error();
  auto b = pods_->keys();
  if (!b) return b.error();
  cookies.insert(a->begin(), a->end());
  cookies.insert(b->begin(), b->end());
  auto keys = exclusion_keys(detail);
  if (!keys) return keys.error();
  std::vector<PodStatus> out;
  for (auto cookie : cookies) {
    auto s = status_of(cookie, detail, *keys);
    if (!s) return s.error();
    out.push_back(std::move(*s));
  }
  return out;
}

Result<Datapath::ExclusionKeys> Datapath::exclusion_keys(Detail detail) {
  ExclusionKeys keys;
  if (detail != Detail::Full) return keys;
  auto p = ports_->keys();
  if (!p) return p.error();
  keys.ports = std::move(*p);
  auto c = cidrs_->keys();
  if (!c) return c.error();
  keys.cidrs = std::move(*c);
  return keys;
}

bool Datapath::has_pod(uint64_t cookie) {
  auto m = meta_->lookup(cookie);
  auto e = pods_->lookup(cookie);
  return (m && m->has_value()) || (e && e->has_value());
}

Result<PodStatus> Datapath::pod(uint64_t cookie, Detail detail) {
  auto keys = exclusion_keys(detail);
  if (!keys) return keys.error();
  return status_of(cookie, detail, *keys);
}

}  // namespace podsteer

namespace podsteer {

namespace {

// The one entry of a per-CPU array, summed over the CPUs; zeros if the map is not there
template <typename T, typename Add>
T sum_over_cpus(const std::string& pin, Add add) {
  T sum{};
  auto m = PercpuMap<__u32, T>::open(pin);
  if (!m) return sum;
  auto row = m->lookup(0);
  if (row && row->has_value())
    for (const auto& cpu : **row) add(sum, cpu);
  return sum;
}

}  // namespace

podsteer_events Datapath::events() const {
  return sum_over_cpus<podsteer_events>(map_pin(state_dir_, "podsteer_events"), [](auto& sum, const auto& cpu) {
    sum.stash_migrated += cpu.stash_migrated;
    sum.stash_missing += cpu.stash_missing;
  });
}

podsteer_full Datapath::full() const {
  return sum_over_cpus<podsteer_full>(map_pin(state_dir_, "podsteer_full"), [](auto& sum, const auto& cpu) {
    sum.orig += cpu.orig;
    sum.transit += cpu.transit;
  });
}

}  // namespace podsteer
