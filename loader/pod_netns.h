// The return path of connections the proxy makes to an app from a client's address,
// made in the pod's netns over netlink (libnl-route-3): the same policy routing as
// Istio's in-pod rules, without iptables or conntrack.
//
//   ip rule add fwmark APP_MARK/MASK pref PREF lookup TABLE    (IPv4 and IPv6)
//   ip route add local 0.0.0.0/0 dev lo table TABLE             (and ::/0)
//   sysctl net.ipv4.tcp_fwmark_accept=1                         (IPv4 and IPv6 alike)
//
// Packets with the app mark are delivered locally, so the app's replies to the client's
// address reach the proxy's socket. The app's side gets the mark from tcp_fwmark_accept:
// its new socket takes the mark of the SYN, which the proxy's socket got from sock_ops
// just before the SYN left (on_connect, sock.bpf.c).
// Rules and routes carry rtm_protocol PODSTEER_RT_PROTO: those are ours to remove; an
// identical rule made by someone else (istio-cni) is used and left alone.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "result.h"

namespace podsteer {

struct ReturnPath {
  uint32_t app_mark = 0, mask = 0, table = 0, pref = 0;
};

struct ReturnPathState {
  bool rule4 = false, rule6 = false;    // a rule with our mark, mask, table and preference
  bool route4 = false, route6 = false;  // the local default route in the table
  int fwmark_accept = -1;               // net.ipv4.tcp_fwmark_accept, -1 if unreadable
  bool ipv6 = true;                     // the netns has IPv6 at all
  bool complete() const { return rule4 && route4 && fwmark_accept == 1 && (!ipv6 || (rule6 && route6)); }
  std::vector<std::string> missing() const;
};

struct ReturnPathMade {
  uint32_t setup = 0;  // PODSTEER_SETUP_* of what this call made
  uint32_t fwmark_accept_before = 0;
};

// Makes whatever of the return path is missing in the netns. Also used to repair.
Result<ReturnPathMade> make_return_path(int netns_fd, const ReturnPath& rp);
// Removes what podsteer made (by protocol) and restores tcp_fwmark_accept when we set it.
Status remove_return_path(int netns_fd, const ReturnPath& rp, uint32_t setup, uint32_t fwmark_accept_before);
Result<ReturnPathState> read_return_path(int netns_fd, const ReturnPath& rp);

// What the pod's TC hooks need to know of its netns, in one visit: its interfaces whose
// other end lives in another netns (veths, as every CNI makes: where connections from
// outside arrive), and the id the node's netns has there (RTM_GETNSID: the kernel's name
// for it in BPF socket lookups). assign: give the node's netns an id there (RTM_NEWNSID)
// when it has none yet; otherwise node_nsid is -1 then.
struct NodeLinks {
  std::vector<unsigned> veths;
  int32_t node_nsid = -1;
};
Result<NodeLinks> node_links(int netns_fd, int node_netns_fd, bool assign);

}  // namespace podsteer
