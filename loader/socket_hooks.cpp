#include "socket_hooks.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "datapath_internal.h"
#include "fd.h"
#include "log.h"
#include "podsteer_sock.skel.h"
#include "skeleton.h"
#include "state_dir.h"
#include "system.h"

namespace podsteer {

using namespace detail;

namespace {

using SockSkel = Skeleton<podsteer_sock, podsteer_sock__open, podsteer_sock__load, podsteer_sock__destroy>;


// The cgroup a pinned link runs at now; 0: no such pin, or detached.
uint64_t link_cgroup(const std::string& pin) {
  auto info = pinned_link_info(pin);
  return info ? info->cgroup.cgroup_id : 0;
}

}  // namespace

struct SocketHooks::Impl {
  std::string state_dir;
  SockSkel skel;
};

SocketHooks::SocketHooks(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SocketHooks::SocketHooks(SocketHooks&&) noexcept = default;
SocketHooks& SocketHooks::operator=(SocketHooks&&) noexcept = default;
SocketHooks::~SocketHooks() = default;

bpf_object* SocketHooks::object() { return impl_->skel->obj; }

Result<SocketHooks> SocketHooks::load(const std::string& state_dir, const podsteer_config& cfg) {
  auto impl = std::make_unique<Impl>();
  impl->state_dir = state_dir;
  if (!impl->skel.opened()) return sys_error("open the socket hooks' BPF object");
  set_rodata(impl->skel->rodata, cfg);
  pin_maps_under(impl->skel->obj, join(state_dir, "maps"));
  if (int err = impl->skel.load(); err)
    return Error{"load the socket programs (run with -v for the verifier log)", -err, state_dir, ErrorCode::kSystem};
  return SocketHooks(std::move(impl));
}

Result<size_t> SocketHooks::attach(const std::string& hook_cgroup, const std::vector<std::string>& only) {
  std::string links = links_dir(impl_->state_dir);
  uint64_t want = cgroup_id(hook_cgroup);
  Fd cg;
  size_t made = 0;
  bpf_program* p;
  bpf_object__for_each_program(p, impl_->skel->obj) {
    std::string name = bpf_program__name(p), pin = join(links, name);
    if (!only.empty() && std::find(only.begin(), only.end(), name) == only.end()) continue;
    Fd old(bpf_obj_get(pin.c_str()));
    if (old.valid() && want != 0 && link_cgroup(pin) == want) {
      if (bpf_link_update(old.get(), bpf_program__fd(p), nullptr) != 0) return sys_error("bpf_link_update", pin);
      continue;
    }
    // missing, detached, or at another cgroup: made anew
    if (old.valid()) bpf_link_detach(old.get());
    unlink(pin.c_str());
    if (!cg.valid()) {
      cg = Fd(::open(hook_cgroup.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
      if (!cg.valid()) return sys_error("open hook cgroup", hook_cgroup);
    }
    bpf_link* l = bpf_program__attach_cgroup(p, cg.get());
    if (!l) return sys_error(fmt::format("attach {} to cgroup", name), hook_cgroup);
    int err = bpf_link__pin(l, pin.c_str());
    bpf_link__destroy(l);  // the pin holds the link from here on
    if (err) return Error{"pin cgroup link", -err, pin, ErrorCode::kSystem};
    ++made;
  }
  return made;
}

std::vector<std::string> SocketHooks::drop_stale_links() {
  std::set<std::string> current(names().begin(), names().end());
  std::vector<std::string> gone;
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(links_dir(impl_->state_dir), ec)) {
    if (current.count(e.path().filename().string())) continue;
    Fd link(bpf_obj_get(e.path().c_str()));
    if (link.valid()) bpf_link_detach(link.get());
    (void)remove_tree(e.path().string());
    gone.push_back(e.path().filename().string());
  }
  return gone;
}

const std::vector<std::string>& SocketHooks::names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    SockSkel sock;
    bpf_program* p;
    if (sock.opened()) bpf_object__for_each_program(p, sock->obj) out.push_back(bpf_program__name(p));
    return out;
  }();
  return names;
}

std::vector<std::string> SocketHooks::missing(const std::string& state_dir, const std::string& hook_cgroup) {
  std::vector<std::string> out;
  uint64_t want = cgroup_id(hook_cgroup);
  for (const auto& name : names())
    if (link_cgroup(join(links_dir(state_dir), name)) != want || want == 0) out.push_back(name);
  return out;
}

void SocketHooks::detach_pinned_links(const std::string& dir) {
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_directory()) continue;
    Fd link(bpf_obj_get(it->path().c_str()));
    if (link.valid() && bpf_link_detach(link.get()) != 0 && errno != ENOLINK)
      spdlog::debug("detach {}: {}", it->path().string(), std::strerror(errno));
  }
}

}  // namespace podsteer
