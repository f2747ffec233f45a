// Inbound capture per pod, and its TC programs, all of the pod's own instance of
// bpf/lookup.bpf.c (its netns cookie, and the node's netns id, written into its code):
//   - the sk_lookup program, linked to the pod's netns, pinned at pods/<cookie>/inbound;
//   - on each of the pod's veth interfaces, two TC programs: at ingress podsteer_node_in
//     (connections the node itself opened), at egress podsteer_pod_out (connections that
//     leave the pod unsteered: the hole check). Each is a cls_bpf filter of ours under clsact
//     (handle 0x5053, the first free priority from 0xc000) whose program is pinned at
//     pods/<cookie>/node_in_clsact_<ifindex>_<priority> (pod_out_clsact_... at egress; the
//     pin names the filter), or, with --tc-mode tcx on a kernel that has it (6.6+), a tcx
//     link pinned at pods/<cookie>/node_in_tcx_<ifindex> (pod_out_tcx_...).
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <sys/socket.h>

#include <filesystem>

#include "datapath.h"
#include "datapath_internal.h"
#include "log.h"
#include "lookup_cookie.h"
#include "pod_netns.h"
#include "podsteer_listeners.skel.h"
#include "podsteer_lookup.skel.h"
#include "skeleton.h"
#include "system.h"

namespace podsteer {

using namespace detail;

namespace {

using LookupSkel = Skeleton<podsteer_lookup, podsteer_lookup__open, podsteer_lookup__load, podsteer_lookup__destroy>;
using ListenersSkel =
    Skeleton<podsteer_listeners, podsteer_listeners__open, podsteer_listeners__load, podsteer_listeners__destroy>;

constexpr int kTcxIngress = 46;              // BPF_TCX_INGRESS (6.6+), absent from Debian's UAPI headers
constexpr int kTcxEgress = 47;               // BPF_TCX_EGRESS
constexpr uint32_t kClsactHandle = 0x5053;   // "PS"
constexpr uint32_t kClsactFirstPrio = 0xc000;

// The pin name prefixes of a hook: [egress][tcx]
const char* tcx_prefix(bool egress) { return egress ? "pod_out_tcx_" : "node_in_tcx_"; }
const char* clsact_prefix(bool egress) { return egress ? "pod_out_clsact_" : "node_in_clsact_"; }
const char* direction(bool egress) { return egress ? "egress" : "ingress"; }

bpf_tc_hook tc_hook(unsigned ifindex, bool egress) {
  bpf_tc_hook hook{};
  hook.sz = sizeof(hook);
  hook.ifindex = static_cast<int>(ifindex);
  hook.attach_point = egress ? BPF_TC_EGRESS : BPF_TC_INGRESS;
  return hook;
}

// Names our cls_bpf filter at prio (handle kClsactHandle).
bpf_tc_opts our_filter(uint32_t prio) {
  bpf_tc_opts opts{};
  opts.sz = sizeof(opts);
  opts.handle = kClsactHandle;
  opts.priority = prio;
  return opts;
}

// Deletes our cls_bpf filter of h; calling thread in the pod's netns.
int delete_clsact(const TcHook& h) {
  bpf_tc_hook hook = tc_hook(h.ifindex, h.egress);
  bpf_tc_opts del = our_filter(h.prio);
  return bpf_tc_detach(&hook, &del);
}

// The program id of our cls_bpf filter of h, 0 if there is none. Calling thread in the
// pod's netns.
uint32_t clsact_prog_id(const TcHook& h) {
  bpf_tc_hook hook = tc_hook(h.ifindex, h.egress);
  bpf_tc_opts opts = our_filter(h.prio);
  return bpf_tc_query(&hook, &opts) == 0 ? opts.prog_id : 0;
}

// The pins of the pod's TC hooks (both directions), read back from their names.
std::vector<TcHook> tc_pins(const std::string& dir) {
  std::vector<TcHook> out;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(dir, ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec)) {
    std::string name = it->path().filename();
    for (bool egress : {false, true}) {
      TcHook h;
      h.egress = egress;
      if (name.rfind(tcx_prefix(egress), 0) == 0) {
        h.mode = "tcx";
        h.ifindex = std::strtoul(name.c_str() + strlen(tcx_prefix(egress)), nullptr, 10);
      } else if (name.rfind(clsact_prefix(egress), 0) == 0) {
        h.mode = "clsact";
        char* rest = nullptr;
        h.ifindex = std::strtoul(name.c_str() + strlen(clsact_prefix(egress)), &rest, 10);
        h.prio = rest && *rest == '_' ? std::strtoul(rest + 1, nullptr, 10) : 0;
      } else {
        continue;
      }
      out.push_back(h);
    }
  }
  return out;
}

std::string tc_pin(const std::string& dir, const TcHook& h) {
  return h.mode == "tcx" ? join(dir, tcx_prefix(h.egress) + std::to_string(h.ifindex))
                         : join(dir, fmt::format("{}{}_{}", clsact_prefix(h.egress), h.ifindex, h.prio));
}

// Fills in id and attached from the kernel. clsact needs the calling thread in the pod's netns.
void read_tc(const std::string& dir, TcHook& h) {
  Fd pin(bpf_obj_get(tc_pin(dir, h).c_str()));
  if (!pin.valid()) return;
  if (h.mode == "tcx") {
    bpf_link_info info{};
    __u32 len = sizeof(info);
    if (bpf_obj_get_info_by_fd(pin.get(), &info, &len) == 0) {
      h.id = info.id;
      // tcx's link info {ifindex, attach_type} sits where netns's {netns_ino, ...} does in
      // libbpf 1.1's header; a link whose device went away reports ifindex 0
      h.attached = info.netns.netns_ino == h.ifindex;
    }
  } else {
    h.id = prog_id_of(pin.get());
    h.attached = h.id && clsact_prog_id(h) == h.id;
  }
}

// Attaches a TC program on one interface; calling thread in the pod's netns. tcx only
// when asked (TcMode): its attach waits for an RCU grace period, 4-19 ms a pod here, where
// a cls_bpf filter takes well under 1 ms; a kernel without tcx gets the filter anyway.
Status attach_tc_one(const std::string& dir, int prog, unsigned ifindex, bool egress, TcMode mode) {
  Fd link(mode == TcMode::Tcx ? bpf_link_create(prog, static_cast<int>(ifindex),
                                                static_cast<bpf_attach_type>(egress ? kTcxEgress : kTcxIngress), nullptr)
                              : -1);
  if (mode != TcMode::Tcx) errno = EINVAL;
  if (link.valid()) {
    TcHook h{ifindex, egress, "tcx"};
    std::string pin = tc_pin(dir, h);
    if (bpf_obj_pin(link.get(), pin.c_str()) != 0) {
      auto e = sys_error("pin tcx link", pin);
      bpf_link_detach(link.get());
      return e;
    }
    return {};
  }
  if (errno != EINVAL) return sys_error(fmt::format("attach tcx {} on ifindex {}", direction(egress), ifindex));
  // No tcx (before 6.6): a cls_bpf filter under clsact, returning "no verdict" so that the
  // filters after it still run. Never replace a filter that is not ours: the first free
  // priority is taken.
  bpf_tc_hook hook = tc_hook(ifindex, egress);
  int err = bpf_tc_hook_create(&hook);
  if (err && err != -EEXIST) return Error{"create clsact qdisc", -err, std::to_string(ifindex)};
  for (uint32_t prio = kClsactFirstPrio; prio <= kClsactFirstPrio + 64; ++prio) {
    bpf_tc_opts opts = our_filter(prio);
    opts.prog_fd = prog;
    err = bpf_tc_attach(&hook, &opts);
    if (err == -EEXIST || err == -EINVAL) continue;  // this priority holds someone else's filter
    if (err) break;
    TcHook h{ifindex, egress, "clsact", 0, prio};
    std::string pin = tc_pin(dir, h);
    if (bpf_obj_pin(prog, pin.c_str()) != 0) {
      auto e = sys_error("pin cls_bpf program", pin);
      (void)delete_clsact(h);
      return e;
    }
    return {};
  }
  return Error{fmt::format("attach cls_bpf {} on ifindex {}", direction(egress), ifindex), -err, ""};
}

// Removes one hook and its pin: a tcx link is detached, a cls_bpf filter removed only while
// it still runs our program. netns_fd -1: the netns is gone, and its filters with it.
void detach_tc_one(const std::string& dir, const TcHook& h, int netns_fd) {
  std::string pin = tc_pin(dir, h);
  Fd obj(bpf_obj_get(pin.c_str()));
  if (h.mode == "tcx") {
    if (obj.valid() && bpf_link_detach(obj.get()) != 0 && errno != ENOLINK)
      spdlog::warn("detach tcx link {}: {}", pin, std::strerror(errno));
  } else if (obj.valid() && netns_fd >= 0) {
    uint32_t ours = prog_id_of(obj.get());
    (void)in_netns(netns_fd, [&]() -> Status {
      if (clsact_prog_id(h) != ours) return {};
      if (int err = delete_clsact(h); err)
        spdlog::warn("detach cls_bpf {} from ifindex {}: {}", direction(h.egress), h.ifindex, std::strerror(-err));
      return {};
    });
  }
  unlink(pin.c_str());
}

}  // namespace

// This pod's instance of lookup.bpf.c, loaded with the node's maps. nsid < 0: no TC
// program (the pod has no veth whose peer netns is known), only sk_lookup.
static Status load_lookup(LookupSkel& skel, const std::string& state_dir, uint64_t cookie, int32_t nsid) {
  if (!skel.opened()) return sys_error("open sk_lookup skeleton");
  auto patch = [&](bpf_program* p, uint64_t magic, uint64_t value, const char* what) -> Status {
    if (int err = set_imm64(p, magic, value); err)
      return Error{fmt::format("write the pod's {} into {} (a build problem if EINVAL)", what, bpf_program__name(p)),
                   -err, std::to_string(cookie)};
    return {};
  };
  PODSTEER_TRY(patch(skel->progs.podsteer_lookup, PODSTEER_LOOKUP_COOKIE_MAGIC, cookie, "netns cookie"));
  if (nsid >= 0) {
    PODSTEER_TRY(patch(skel->progs.podsteer_node_in, PODSTEER_LOOKUP_COOKIE_MAGIC, cookie, "netns cookie"));
    PODSTEER_TRY(patch(skel->progs.podsteer_node_in, PODSTEER_NODE_NSID_MAGIC, uint64_t(nsid), "node netns id"));
    PODSTEER_TRY(patch(skel->progs.podsteer_pod_out, PODSTEER_LOOKUP_COOKIE_MAGIC, cookie, "netns cookie"));
  } else {
    bpf_program__set_autoload(skel->progs.podsteer_node_in, false);
    bpf_program__set_autoload(skel->progs.podsteer_pod_out, false);
  }
  pin_maps_under(skel->obj, join(state_dir, "maps"));
  if (int err = skel.load(); err)
    return Error{"load the pod's inbound programs (run with -v for the verifier log)", -err, std::to_string(cookie)};
  return {};
}

NodeLinks Datapath::node_links_of(const Netns& pod, bool assign) const {
  Fd node(::open(node_netns_.c_str(), O_RDONLY | O_CLOEXEC));
  if (!node.valid()) {
    spdlog::warn("open the node's netns {}: {} (connections the node opens to pods are captured)", node_netns_,
                 std::strerror(errno));
    return {};
  }
  auto links = node_links(pod.fd.get(), node.get(), assign);
  if (!links) {
    spdlog::warn("the node's netns id in {}: {} (connections the node opens to it are captured)", pod.path,
                 links.error().message());
    return {};
  }
  return *links;
}

Status Datapath::upgrade_inbound(uint64_t cookie) {
  std::string pin = inbound_pin(state_dir_, cookie);
  Fd link(bpf_obj_get(pin.c_str()));
  if (!link.valid()) return {};  // not linked (being enrolled or removed): nothing to replace
  auto meta = meta_->lookup(cookie);
  std::optional<Netns> ns;
  if (meta && meta->has_value())
    if (auto r = open_netns(str_of((*meta)->netns_path, sizeof((*meta)->netns_path))); r && r->cookie == cookie)
      ns.emplace(std::move(*r));
  int32_t nsid = ns ? node_links_of(*ns, true).node_nsid : -1;
  LookupSkel skel;
  PODSTEER_TRY(load_lookup(skel, state_dir_, cookie, nsid));
  if (bpf_link_update(link.get(), bpf_program__fd(skel->progs.podsteer_lookup), nullptr) != 0)
    return sys_error("bpf_link_update", pin);
  if (!ns || nsid < 0) return {};
  // The TC hooks: a tcx link is updated in place; a cls_bpf filter is replaced at its
  // handle and priority (BPF_TC_F_REPLACE), so no packet passes unseen in between.
  std::string dir = pod_dir(state_dir_, cookie);
  auto prog_of = [&](bool egress) {
    return bpf_program__fd(egress ? skel->progs.podsteer_pod_out : skel->progs.podsteer_node_in);
  };
  for (const auto& h : tc_pins(dir)) {
    std::string hpin = tc_pin(dir, h);
    int prog = prog_of(h.egress);
    if (h.mode == "tcx") {
      Fd l(bpf_obj_get(hpin.c_str()));
      if (l.valid() && bpf_link_update(l.get(), prog, nullptr) != 0) return sys_error("bpf_link_update", hpin);
      continue;
    }
    PODSTEER_TRY(in_netns(ns->fd.get(), [&]() -> Status {
      bpf_tc_hook hook = tc_hook(h.ifindex, h.egress);
      bpf_tc_opts opts = our_filter(h.prio);
      opts.prog_fd = prog;
      opts.flags = BPF_TC_F_REPLACE;
      if (int err = bpf_tc_attach(&hook, &opts); err) return Error{"replace cls_bpf filter", -err, hpin};
      return {};
    }));
    unlink(hpin.c_str());
    if (bpf_obj_pin(prog, hpin.c_str()) != 0) return sys_error("pin cls_bpf program", hpin);
  }
  // a pod captured by a build without a TC program gains it now
  auto now = inbound_status(cookie, &*ns);
  return in_netns(ns->fd.get(), [&]() -> Status {
    for (unsigned ifindex : now.node_in_missing)
      PODSTEER_TRY(attach_tc_one(dir, prog_of(false), ifindex, false, tc_mode_));
    for (unsigned ifindex : now.pod_out_missing)
      PODSTEER_TRY(attach_tc_one(dir, prog_of(true), ifindex, true, tc_mode_));
    return {};
  });
}

Status Datapath::attach_inbound(const Netns& ns) {
  std::string dir = pod_dir(state_dir_, ns.cookie);
  PODSTEER_TRY(make_dir(dir));
  NodeLinks links = node_links_of(ns, true);  // first: the status expects hooks once there is an id
  int32_t nsid = links.node_nsid;
  InboundStatus now = inbound_status(ns.cookie, &ns, &links);
  if (now.attached && now.node_in_missing.empty() && now.pod_out_missing.empty())
    return {};  // re-enroll: everything is there
  std::string pin = inbound_pin(state_dir_, ns.cookie);
  if (!now.attached && path_exists(pin)) {
    // pinned but detached (by hand, bpftool link detach): a new link replaces it
    Fd old(bpf_obj_get(pin.c_str()));
    if (old.valid()) bpf_link_detach(old.get());
    unlink(pin.c_str());
  }
  LookupSkel skel;
  PODSTEER_TRY(load_lookup(skel, state_dir_, ns.cookie, nsid));
  if (!now.attached) {
    bpf_link* link = bpf_program__attach_netns(skel->progs.podsteer_lookup, ns.fd.get());
    if (!link) return sys_error("link sk_lookup program to the pod's netns", ns.path);
    int err = bpf_link__pin(link, pin.c_str());
    if (err) bpf_link__detach(link);
    bpf_link__destroy(link);  // the pin holds the link (and the program) from here on
    if (err) return Error{"pin sk_lookup link", -err, pin};
  }
  if ((now.node_in_missing.empty() && now.pod_out_missing.empty()) || nsid < 0) return {};
  // a hook pinned but no longer running (its filter deleted by hand) is replaced
  for (const auto* hooks : {&now.node_in, &now.pod_out})
    for (const auto& h : *hooks)
      if (!h.attached) detach_tc_one(dir, h, ns.fd.get());
  int in = bpf_program__fd(skel->progs.podsteer_node_in), out = bpf_program__fd(skel->progs.podsteer_pod_out);
  return in_netns(ns.fd.get(), [&]() -> Status {
    for (unsigned ifindex : now.node_in_missing) PODSTEER_TRY(attach_tc_one(dir, in, ifindex, false, tc_mode_));
    for (unsigned ifindex : now.pod_out_missing) PODSTEER_TRY(attach_tc_one(dir, out, ifindex, true, tc_mode_));
    return {};
  });
}

void detail::detach_node_in_hooks(const std::string& state_dir, uint64_t cookie, int netns_fd) {
  std::string dir = pod_dir(state_dir, cookie);
  for (const auto& h : tc_pins(dir)) detach_tc_one(dir, h, netns_fd);
}

void Datapath::detach_inbound(uint64_t cookie, int netns_fd) {
  std::string dir = pod_dir(state_dir_, cookie);
  detach_node_in_hooks(state_dir_, cookie, netns_fd);
  std::string pin = inbound_pin(state_dir_, cookie);
  Fd link(bpf_obj_get(pin.c_str()));
  if (link.valid() && bpf_link_detach(link.get()) != 0 && errno != ENOLINK)
    spdlog::warn("detach sk_lookup link {}: {}", pin, std::strerror(errno));
  (void)remove_tree(dir);
}

Status Datapath::find_listeners(const Netns& ns) {
  for (uint16_t family : {AF_INET6, AF_INET}) {
    podsteer_listener_key k = listener_key(ns.cookie, config_.inbound_port, family);
    __u64 v;
    if (bpf_map_lookup_elem(listeners_.get(), &k, &v) == 0) return {};  // the proxy is known
  }
  ListenersSkel skel;
  if (!skel.opened()) return sys_error("open listener iterator skeleton");
  set_rodata(skel->rodata, config_);
  skel->rodata->cfg_pod_cookie = ns.cookie;
  pin_maps_under(skel->obj, join(state_dir_, "maps"));
  if (int err = skel.load(); err) return Error{"load listener iterator", -err, ns.path};
  bpf_link* link = bpf_program__attach_iter(skel->progs.podsteer_find_listeners, nullptr);
  if (!link) return sys_error("attach listener iterator", ns.path);
  // the iterator walks the sockets of the netns it is opened in
  Status st = in_netns(ns.fd.get(), [&]() -> Status {
    Fd it(bpf_iter_create(bpf_link__fd(link)));
    if (!it.valid()) return sys_error("bpf_iter_create");
    char buf[64];
    while (true) {
      ssize_t n = read(it.get(), buf, sizeof(buf));
      if (n == 0) return {};
      if (n < 0 && errno != EINTR) return sys_error("read listener iterator");
    }
  });
  bpf_link__destroy(link);
  return st;
}

InboundStatus Datapath::inbound_status(uint64_t cookie, const Netns* ns, const NodeLinks* known) const {
  InboundStatus s;
  if (auto info = pinned_link_info(inbound_pin(state_dir_, cookie))) {
    s.link_id = info->id;
    s.prog_id = info->prog_id;
    // a netns link whose netns went away reports inode 0
    s.attached = info->netns.netns_ino != 0 && ns && ns->cookie == cookie;
  }
  for (uint16_t family : {AF_INET6, AF_INET}) {
    podsteer_listener_key k = listener_key(cookie, config_.inbound_port, family);
    __u64 v;
    if (bpf_map_lookup_elem(listeners_.get(), &k, &v) == 0) s.proxy_listening = true;
  }
  std::string dir = pod_dir(state_dir_, cookie);
  for (const auto& h : tc_pins(dir)) (h.egress ? s.pod_out : s.node_in).push_back(h);
  if (!ns || ns->cookie != cookie) return s;
  if (!s.node_in.empty() || !s.pod_out.empty())
    (void)in_netns(ns->fd.get(), [&]() -> Status {
      for (auto* hooks : {&s.node_in, &s.pod_out})
        for (auto& h : *hooks) read_tc(dir, h);
      return {};
    });
  // The hooks a pod should have: none while the node's netns has no id in it (not enrolled
  // by this build yet: the upgrade adds them), else one per veth.
  NodeLinks links = known ? *known : node_links_of(*ns, false);
  if (links.node_nsid < 0) return s;
  auto have = [&](const std::vector<TcHook>& hooks, unsigned ifindex) {
    for (const auto& h : hooks)
      if (h.ifindex == ifindex && h.attached) return true;
    return false;
  };
  for (unsigned ifindex : links.veths) {
    if (!have(s.node_in, ifindex)) s.node_in_missing.push_back(ifindex);
    if (!have(s.pod_out, ifindex)) s.pod_out_missing.push_back(ifindex);
  }
  return s;
}

}  // namespace podsteer
