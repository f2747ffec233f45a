#include "pod_netns.h"

#include <linux/fib_rules.h>
#include <linux/if.h>
#include <linux/net_namespace.h>
#include <linux/rtnetlink.h>
#include <netlink/addr.h>
#include <netlink/netlink.h>
#include <netlink/route/nexthop.h>
#include <netlink/route/link.h>
#include <netlink/route/route.h>
#include <netlink/route/rule.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <memory>

#include "netns.h"
#include "podsteer_abi.h"
#include "system.h"

namespace podsteer {
namespace {

constexpr int kLoopbackIfindex = 1;  // lo is ifindex 1 in every netns

// /proc/sys/net, or where PODSTEER_PROC_SYS_NET says it is mounted. A container that is not
// privileged gets /proc/sys read-only (and AppArmor's default container profile denies writes
// below /proc/sys), so the DaemonSet mounts the node's /proc/sys/net (a hostPath) at
// /host/proc/sys/net, as Cilium's agent does. Which netns a file below it shows is decided at
// open() by the opening thread's netns, whichever procfs mount the path goes through: inside
// in_netns() it is the pod's.
std::string sysctl_net(const char* rel) {
  const char* root = std::getenv("PODSTEER_PROC_SYS_NET");
  return std::string(root && *root ? root : "/proc/sys/net") + "/" + rel;
}

struct SockFree {
  void operator()(nl_sock* s) const { nl_socket_free(s); }
};
struct CacheFree {
  void operator()(nl_cache* c) const { nl_cache_free(c); }
};
struct ObjectPut {
  void operator()(nl_object* o) const { nl_object_put(o); }
};
using NlSock = std::unique_ptr<nl_sock, SockFree>;
using NlCache = std::unique_ptr<nl_cache, CacheFree>;

Error nl_error(const std::string& op, int err) { return Error{op + ": " + nl_geterror(err), 0, ""}; }

// A route netlink socket of the calling thread's netns.
Result<NlSock> route_socket() {
  NlSock s(nl_socket_alloc());
  if (!s) return invalid("nl_socket_alloc failed");
  if (int err = nl_connect(s.get(), NETLINK_ROUTE); err < 0) return nl_error("connect route netlink", err);
  return s;
}

bool ipv6_enabled() {
  if (!path_exists(sysctl_net("ipv6"))) return false;
  std::ifstream in(sysctl_net("ipv6/conf/all/disable_ipv6"));
  int v = 0;
  return !(in >> v) || v == 0;
}

bool our_rule(rtnl_rule* r, int family, const ReturnPath& rp) {
  return rtnl_rule_get_family(r) == family && rtnl_rule_get_prio(r) == rp.pref && rtnl_rule_get_mark(r) == rp.app_mark &&
         rtnl_rule_get_mask(r) == rp.mask && rtnl_rule_get_table(r) == rp.table &&
         rtnl_rule_get_action(r) == FR_ACT_TO_TBL;
}

bool our_route(rtnl_route* r, int family, const ReturnPath& rp) {
  nl_addr* dst = rtnl_route_get_dst(r);
  return rtnl_route_get_family(r) == family && rtnl_route_get_table(r) == rp.table &&
         rtnl_route_get_type(r) == RTN_LOCAL && (!dst || nl_addr_get_prefixlen(dst) == 0);
}

uint8_t protocol_of(rtnl_rule* r) {
  uint8_t p = 0;
  return rtnl_rule_get_protocol(r, &p) == 0 ? p : 0;
}

// Calls fn(rule) for each rule of the family; fn returns false to stop.
template <typename F>
Status each_rule(nl_sock* s, int family, F fn) {
  nl_cache* raw = nullptr;
  if (int err = rtnl_rule_alloc_cache(s, family, &raw); err < 0) return nl_error("list rules", err);
  NlCache cache(raw);
  for (nl_object* o = nl_cache_get_first(raw); o; o = nl_cache_get_next(o))
    if (!fn(reinterpret_cast<rtnl_rule*>(o))) break;
  return {};
}

template <typename F>
Status each_route(nl_sock* s, int family, F fn) {
  nl_cache* raw = nullptr;
  if (int err = rtnl_route_alloc_cache(s, family, 0, &raw); err < 0) return nl_error("list routes", err);
  NlCache cache(raw);
  for (nl_object* o = nl_cache_get_first(raw); o; o = nl_cache_get_next(o))
    if (!fn(reinterpret_cast<rtnl_route*>(o))) break;
  return {};
}

Result<bool> has_rule(nl_sock* s, int family, const ReturnPath& rp) {
  bool found = false;
  PODSTEER_TRY(each_rule(s, family, [&](rtnl_rule* r) { return !(found = our_rule(r, family, rp)); }));
  return found;
}

Result<bool> has_route(nl_sock* s, int family, const ReturnPath& rp) {
  bool found = false;
  PODSTEER_TRY(each_route(s, family, [&](rtnl_route* r) { return !(found = our_route(r, family, rp)); }));
  return found;
}

Status add_rule(nl_sock* s, int family, const ReturnPath& rp) {
  std::unique_ptr<rtnl_rule, void (*)(rtnl_rule*)> r(rtnl_rule_alloc(), rtnl_rule_put);
  rtnl_rule_set_family(r.get(), family);
  rtnl_rule_set_prio(r.get(), rp.pref);
  rtnl_rule_set_mark(r.get(), rp.app_mark);
  rtnl_rule_set_mask(r.get(), rp.mask);
  rtnl_rule_set_table(r.get(), rp.table);
  rtnl_rule_set_action(r.get(), FR_ACT_TO_TBL);
  rtnl_rule_set_protocol(r.get(), PODSTEER_RT_PROTO);
  if (int err = rtnl_rule_add(s, r.get(), NLM_F_EXCL); err < 0)
    return nl_error(family == AF_INET ? "add IPv4 policy rule" : "add IPv6 policy rule", err);
  return {};
}

Status add_route(nl_sock* s, int family, const ReturnPath& rp) {
  std::unique_ptr<rtnl_route, void (*)(rtnl_route*)> r(rtnl_route_alloc(), rtnl_route_put);
  rtnl_route_set_family(r.get(), family);
  rtnl_route_set_table(r.get(), rp.table);
  rtnl_route_set_type(r.get(), RTN_LOCAL);
  rtnl_route_set_scope(r.get(), RT_SCOPE_HOST);
  rtnl_route_set_protocol(r.get(), PODSTEER_RT_PROTO);
  uint8_t zero[16] = {};
  std::unique_ptr<nl_addr, void (*)(nl_addr*)> dst(nl_addr_build(family, zero, family == AF_INET ? 4 : 16), nl_addr_put);
  nl_addr_set_prefixlen(dst.get(), 0);
  rtnl_route_set_dst(r.get(), dst.get());
  rtnl_nexthop* nh = rtnl_route_nh_alloc();
  rtnl_route_nh_set_ifindex(nh, kLoopbackIfindex);
  rtnl_route_add_nexthop(r.get(), nh);  // the route owns nh from here
  if (int err = rtnl_route_add(s, r.get(), NLM_F_EXCL); err < 0)
    return nl_error(family == AF_INET ? "add IPv4 local route" : "add IPv6 local route", err);
  return {};
}

// The local routes need lo up (the kernel refuses an IPv6 route through a loopback that is
// down). A runtime brings it up for every pod - containerd runs its loopback network
// first, podman sets it itself - but a chain run before that would fail: bring it up, as
// the loopback plugin is about to.
Status ensure_loopback_up(nl_sock* s) {
  rtnl_link* lo = nullptr;
  if (int err = rtnl_link_get_kernel(s, kLoopbackIfindex, nullptr, &lo); err < 0) return nl_error("get lo", err);
  std::unique_ptr<rtnl_link, void (*)(rtnl_link*)> have(lo, rtnl_link_put);
  if (rtnl_link_get_flags(lo) & IFF_UP) return {};
  std::unique_ptr<rtnl_link, void (*)(rtnl_link*)> change(rtnl_link_alloc(), rtnl_link_put);
  rtnl_link_set_flags(change.get(), IFF_UP);
  if (int err = rtnl_link_change(s, lo, change.get(), 0); err < 0) return nl_error("bring lo up", err);
  return {};
}

int read_fwmark_accept() {
  std::ifstream in(sysctl_net("ipv4/tcp_fwmark_accept"));
  int v = -1;
  in >> v;
  return in ? v : -1;
}

Status write_fwmark_accept(int v) {
  const std::string path = sysctl_net("ipv4/tcp_fwmark_accept");
  std::ofstream out(path);
  if (!out && errno == EROFS)
    return Error{"write (a container that is not privileged has /proc/sys read-only: mount the node's "
                 "/proc/sys/net elsewhere and set PODSTEER_PROC_SYS_NET to it, as the Helm chart's DaemonSet does)",
                 EROFS, path};
  out << v << "\n";
  out.flush();
  if (!out) return sys_error("write", path.c_str());
  return {};
}

}  // namespace

std::vector<std::string> ReturnPathState::missing() const {
  std::vector<std::string> out;
  if (!rule4) out.push_back("IPv4 policy rule");
  if (!route4) out.push_back("IPv4 local route");
  if (ipv6 && !rule6) out.push_back("IPv6 policy rule");
  if (ipv6 && !route6) out.push_back("IPv6 local route");
  if (fwmark_accept != 1) out.push_back("net.ipv4.tcp_fwmark_accept=1");
  return out;
}

Result<ReturnPathState> read_return_path(int netns_fd, const ReturnPath& rp) {
  ReturnPathState st;
  Status s = in_netns(netns_fd, [&]() -> Status {
    auto sock = route_socket();
    if (!sock) return sock.error();
    st.ipv6 = ipv6_enabled();
    auto r4 = has_rule(sock->get(), AF_INET, rp);
    if (!r4) return r4.error();
    auto t4 = has_route(sock->get(), AF_INET, rp);
    if (!t4) return t4.error();
    st.rule4 = *r4;
    st.route4 = *t4;
    if (st.ipv6) {
      auto r6 = has_rule(sock->get(), AF_INET6, rp);
      if (!r6) return r6.error();
      auto t6 = has_route(sock->get(), AF_INET6, rp);
      if (!t6) return t6.error();
      st.rule6 = *r6;
      st.route6 = *t6;
    }
    st.fwmark_accept = read_fwmark_accept();
    return {};
  });
  if (!s) return s.error();
  return st;
}

Result<ReturnPathMade> make_return_path(int netns_fd, const ReturnPath& rp) {
  ReturnPathMade made;
  Status s = in_netns(netns_fd, [&]() -> Status {
    auto sock = route_socket();
    if (!sock) return sock.error();
    PODSTEER_TRY(ensure_loopback_up(sock->get()));
    std::vector<int> families = {AF_INET};
    if (ipv6_enabled()) families.push_back(AF_INET6);
    for (int family : families) {
      bool v4 = family == AF_INET;
      auto rule = has_rule(sock->get(), family, rp);
      if (!rule) return rule.error();
      if (!*rule) {
        PODSTEER_TRY(add_rule(sock->get(), family, rp));
        made.setup |= v4 ? PODSTEER_SETUP_RULE4 : PODSTEER_SETUP_RULE6;
      }
      auto route = has_route(sock->get(), family, rp);
      if (!route) return route.error();
      if (!*route) {
        PODSTEER_TRY(add_route(sock->get(), family, rp));
        made.setup |= v4 ? PODSTEER_SETUP_ROUTE4 : PODSTEER_SETUP_ROUTE6;
      }
    }
    int before = read_fwmark_accept();
    if (before < 0) return sys_error("read", sysctl_net("ipv4/tcp_fwmark_accept").c_str());
    if (before != 1) {
      PODSTEER_TRY(write_fwmark_accept(1));
      made.setup |= PODSTEER_SETUP_FWMARK_ACCEPT;
      made.fwmark_accept_before = before;
    }
    return {};
  });
  if (!s) {
    // what this call made goes again: a failed enroll leaves nothing behind
    (void)remove_return_path(netns_fd, rp, made.setup, made.fwmark_accept_before);
    return s.error();
  }
  return made;
}

Status remove_return_path(int netns_fd, const ReturnPath& rp, uint32_t setup, uint32_t fwmark_accept_before) {
  return in_netns(netns_fd, [&]() -> Status {
    auto sock = route_socket();
    if (!sock) return sock.error();
    Status first;  // keep going on errors: remove as much as can be removed
    auto note = [&](Status st) {
      if (!st && first) first = st;
    };
    for (int family : {AF_INET, AF_INET6}) {
      std::vector<std::unique_ptr<nl_object, ObjectPut>> doomed;
      note(each_rule(sock->get(), family, [&](rtnl_rule* r) {
        if (our_rule(r, family, rp) && protocol_of(r) == PODSTEER_RT_PROTO) {
          nl_object_get(OBJ_CAST(r));
          doomed.emplace_back(OBJ_CAST(r));
        }
        return true;
      }));
      for (auto& o : doomed)
        if (int err = rtnl_rule_delete(sock->get(), reinterpret_cast<rtnl_rule*>(o.get()), 0); err < 0)
          note(nl_error("delete policy rule", err));
      doomed.clear();
      note(each_route(sock->get(), family, [&](rtnl_route* r) {
        if (our_route(r, family, rp) && rtnl_route_get_protocol(r) == PODSTEER_RT_PROTO) {
          nl_object_get(OBJ_CAST(r));
          doomed.emplace_back(OBJ_CAST(r));
        }
        return true;
      }));
      for (auto& o : doomed)
        if (int err = rtnl_route_delete(sock->get(), reinterpret_cast<rtnl_route*>(o.get()), 0); err < 0)
          note(nl_error("delete local route", err));
    }
    // put the sysctl back only if it is still what we made it
    if ((setup & PODSTEER_SETUP_FWMARK_ACCEPT) && read_fwmark_accept() == 1)
      note(write_fwmark_accept(int(fwmark_accept_before)));
    return first;
  });
}

namespace {

// One RTM_GETNSID or RTM_NEWNSID for `other_fd` on a route socket of the calling thread's
// netns; the NETNSA_NSID of the answer (GET: -1 when it has none) or 0 (NEW).
Result<int32_t> nsid_request(nl_sock* sock, int type, int other_fd) {
  std::unique_ptr<nl_msg, void (*)(nl_msg*)> msg(nlmsg_alloc_simple(type, NLM_F_REQUEST | NLM_F_ACK), nlmsg_free);
  if (!msg) return invalid("nlmsg_alloc failed");
  rtgenmsg g{};
  g.rtgen_family = AF_UNSPEC;
  if (nlmsg_append(msg.get(), &g, sizeof(g), NLMSG_ALIGNTO) < 0 || nla_put_u32(msg.get(), NETNSA_FD, other_fd) < 0 ||
      (type == RTM_NEWNSID && nla_put_s32(msg.get(), NETNSA_NSID, -1) < 0))
    return invalid("build nsid request");
  struct Answer {
    int32_t nsid = -1;
    bool got = false;
  } answer;
  auto parse = [](nl_msg* m, void* arg) -> int {
    auto* a = static_cast<Answer*>(arg);
    nlattr* tb[NETNSA_MAX + 1] = {};
    if (nlmsg_hdr(m)->nlmsg_type == RTM_NEWNSID &&
        nlmsg_parse(nlmsg_hdr(m), sizeof(rtgenmsg), tb, NETNSA_MAX, nullptr) == 0 && tb[NETNSA_NSID]) {
      a->nsid = nla_get_s32(tb[NETNSA_NSID]);
      a->got = true;
    }
    return NL_OK;
  };
  // nl_socket_get_cb takes a reference of its own: put back once cloned
  std::unique_ptr<nl_cb, void (*)(nl_cb*)> socket_cb(nl_socket_get_cb(sock), nl_cb_put);
  std::unique_ptr<nl_cb, void (*)(nl_cb*)> cb(nl_cb_clone(socket_cb.get()), nl_cb_put);
  if (!cb) return invalid("nl_cb_clone failed");
  nl_cb_set(cb.get(), NL_CB_VALID, NL_CB_CUSTOM, parse, &answer);
  bool acked = false;
  nl_cb_set(cb.get(), NL_CB_ACK, NL_CB_CUSTOM, [](nl_msg*, void* arg) -> int {
    *static_cast<bool*>(arg) = true;
    return NL_STOP;
  }, &acked);
  if (int err = nl_send_auto(sock, msg.get()); err < 0) return nl_error("send nsid request", err);
  while (!acked) {
    int err = nl_recvmsgs(sock, cb.get());
    if (err < 0) return nl_error(type == RTM_GETNSID ? "RTM_GETNSID" : "RTM_NEWNSID", err);
  }
  if (type == RTM_NEWNSID) return 0;
  return answer.got ? answer.nsid : -1;
}

}  // namespace

Result<NodeLinks> node_links(int netns_fd, int node_netns_fd, bool assign) {
  NodeLinks out;
  Status s = in_netns(netns_fd, [&]() -> Status {
    auto sock = route_socket();
    if (!sock) return sock.error();
    nl_cache* raw = nullptr;
    if (int err = rtnl_link_alloc_cache(sock->get(), AF_UNSPEC, &raw); err < 0) return nl_error("list links", err);
    NlCache cache(raw);
    for (nl_object* o = nl_cache_get_first(cache.get()); o; o = nl_cache_get_next(o)) {
      auto* link = reinterpret_cast<rtnl_link*>(o);
      int32_t peer = -1;
      if (rtnl_link_get_ifindex(link) != kLoopbackIfindex && rtnl_link_get_link_netnsid(link, &peer) == 0 && peer >= 0)
        out.veths.push_back(static_cast<unsigned>(rtnl_link_get_ifindex(link)));
    }
    auto got = nsid_request(sock->get(), RTM_GETNSID, node_netns_fd);
    if (!got) return got.error();
    out.node_nsid = *got;
    if (out.node_nsid >= 0 || !assign) return {};
    auto made = nsid_request(sock->get(), RTM_NEWNSID, node_netns_fd);
    if (!made) return made.error();
    auto again = nsid_request(sock->get(), RTM_GETNSID, node_netns_fd);
    if (!again) return again.error();
    out.node_nsid = *again;
    return {};
  });
  if (!s) return s.error();
  if (out.node_nsid < 0 && assign) return invalid("the node's netns has no id in the pod's netns");
  return out;
}

}  // namespace podsteer
