// Taking over a pod that istio-cni captured before the switch to podsteer. istio-cni put
// Istio's in-pod rules in the pod's netns (cni/pkg/iptables/iptables.go, AppendInpodRules:
// chains ISTIO_PRERT and ISTIO_OUTPUT in the nat, mangle and, with DNS capture, raw tables,
// through iptables-nft or iptables-legacy). Once podsteer's capture of the pod is live:
//   - the nat and raw chains go (new connections are podsteer's; connections Istio's REDIRECT
//     set up keep their NAT binding in conntrack, which needs no rule), and so does mangle's
//     PREROUTING chain (it gives new connections of the proxy Istio's connmark 0x111);
//   - mangle's OUTPUT chain (restore that connmark onto the app's packets, which routes the
//     replies of connections the proxy opened from a client's address back to it) stays until
//     no open connection carries the connmark, then goes too.
// Istio's policy rule and local route (fwmark 0x111/0xfff, pref 32764, table 100) are the same
// as podsteer's return path and stay. The iptables and conntrack commands run in the pod's
// netns (as istio-cni runs them); the rules' owners are Istio's tools, whose chains only they
// know the syntax of.
#pragma once

#include <string>
#include <vector>

#include "result.h"

namespace podsteer::istio {

struct CommandResult {
  int rc = -1;
  std::string out;  // stdout and stderr
};
// argv run with the netns as its network namespace (fork, setns, exec), at most timeout_ms.
Result<CommandResult> run_in_netns(int netns_fd, const std::vector<std::string>& argv, int timeout_ms = 5000);

struct Takeover {
  bool found = false;           // Istio's in-pod chains were there
  bool restore_pending = false;  // mangle's OUTPUT chain kept for open connections
};
// Istio's in-pod chains are in the netns (an iptables-save per front end).
bool has_inpod_rules(int netns_fd);
// Removes Istio's redirect chains from the netns (see above).
Result<Takeover> remove_redirects(int netns_fd);
// Removes mangle's OUTPUT chain once no open connection carries Istio's connmark; true when
// it is gone (or was never there).
Result<bool> remove_restore_if_unused(int netns_fd);

}  // namespace podsteer::istio
