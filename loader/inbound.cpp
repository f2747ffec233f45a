// Inbound capture per pod: the pod's own instance of the sk_lookup program (its netns
// cookie written into its code: sk_lookup cannot ask for it), linked to the pod's netns and pinned
// at pods/<cookie>/inbound.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/socket.h>

#include "datapath.h"
#include "datapath_internal.h"
#include "log.h"
#include "lookup_cookie.h"
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

}  // namespace

// This pod's instance of the sk_lookup program, loaded with the node's maps.
static Status load_lookup(LookupSkel& skel, const std::string& state_dir, uint64_t cookie) {
  if (!skel.opened()) return sys_error("open sk_lookup skeleton");
  if (int err = set_lookup_cookie(skel->progs.podsteer_lookup, cookie); err)
    return Error{"write the pod's cookie into its sk_lookup program (a build problem if EINVAL)", -err,
                 std::to_string(cookie)};
  pin_maps_under(skel->obj, join(state_dir, "maps"));
  if (int err = skel.load(); err)
    return Error{"load sk_lookup program (run with -v for the verifier log)", -err, std::to_string(cookie)};
  return {};
}

Status Datapath::upgrade_inbound(uint64_t cookie) {
  std::string pin = inbound_pin(state_dir_, cookie);
  Fd link(bpf_obj_get(pin.c_str()));
  if (!link.valid()) return {};  // not linked (being enrolled or removed): nothing to replace
  LookupSkel skel;
  PODSTEER_TRY(load_lookup(skel, state_dir_, cookie));
  if (bpf_link_update(link.get(), bpf_program__fd(skel->progs.podsteer_lookup), nullptr) != 0)
    return sys_error("bpf_link_update", pin);
  return {};
}

Status Datapath::attach_inbound(const Netns& ns) {
  PODSTEER_TRY(make_dir(pod_dir(state_dir_, ns.cookie)));
  std::string pin = inbound_pin(state_dir_, ns.cookie);
  if (path_exists(pin)) {
    if (inbound_status(ns.cookie, ns.cookie).attached) return {};  // re-enroll: the link is there
    // pinned but detached (by hand, bpftool link detach): a new link replaces it
    Fd old(bpf_obj_get(pin.c_str()));
    if (old.valid()) bpf_link_detach(old.get());
    unlink(pin.c_str());
  }
  LookupSkel skel;
  PODSTEER_TRY(load_lookup(skel, state_dir_, ns.cookie));
  bpf_link* link = bpf_program__attach_netns(skel->progs.podsteer_lookup, ns.fd.get());
  if (!link) return sys_error("link sk_lookup program to the pod's netns", ns.path);
  int err = bpf_link__pin(link, pin.c_str());
  if (err) bpf_link__detach(link);
  bpf_link__destroy(link);  // the pin holds the link (and the program) from here on
  if (err) return Error{"pin sk_lookup link", -err, pin};
  return {};
}

void Datapath::detach_inbound(uint64_t cookie) {
  std::string pin = inbound_pin(state_dir_, cookie);
  Fd link(bpf_obj_get(pin.c_str()));
  if (link.valid() && bpf_link_detach(link.get()) != 0 && errno != ENOLINK)
    spdlog::warn("detach sk_lookup link {}: {}", pin, std::strerror(errno));
  (void)remove_tree(pod_dir(state_dir_, cookie));
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

InboundStatus Datapath::inbound_status(uint64_t cookie, uint64_t netns_cookie_now) const {
  InboundStatus s;
  Fd link(bpf_obj_get(inbound_pin(state_dir_, cookie).c_str()));
  if (link.valid()) {
    bpf_link_info info{};
    __u32 len = sizeof(info);
    if (bpf_obj_get_info_by_fd(link.get(), &info, &len) == 0) {
      s.link_id = info.id;
      s.prog_id = info.prog_id;
      // a netns link whose netns went away reports inode 0
      s.attached = info.netns.netns_ino != 0 && netns_cookie_now == cookie;
    }
  }
  for (uint16_t family : {AF_INET6, AF_INET}) {
    podsteer_listener_key k = listener_key(cookie, config_.inbound_port, family);
    __u64 v;
    if (bpf_map_lookup_elem(listeners_.get(), &k, &v) == 0) s.proxy_listening = true;
  }
  return s;
}

}  // namespace podsteer
