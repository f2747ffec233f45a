// Upgrade in place: a podsteer whose programs differ from the pinned ones (a newer build)
// replaces them link by link with bpf_link_update. The links stay where they are: no pod
// is detached for a moment, and established connections never notice.
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "datapath.h"
#include "datapath_internal.h"
#include "log.h"
#include "podsteer_lookup.skel.h"
#include "podsteer_sock.skel.h"
#include "skeleton.h"
#include "system.h"

namespace podsteer {

using namespace detail;

namespace {

using SockSkel = Skeleton<podsteer_sock, podsteer_sock__open, podsteer_sock__load, podsteer_sock__destroy>;

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace

uint64_t programs_id() {
  static const uint64_t id = [] {
    uint64_t h = 0xcbf29ce484222325ull;
    size_t n = 0;
    const void* sock = podsteer_sock__elf_bytes(&n);
    h = fnv1a(h, sock, n);
    const void* lookup = podsteer_lookup__elf_bytes(&n);
    return fnv1a(h, lookup, n);
  }();
  return id;
}

namespace {

// The hook cgroup's id, as bpf_link_info reports it for an attached link.
uint64_t cgroup_id(const std::string& path) {
  struct {
    struct file_handle fh;
    uint64_t id;
  } h{};
  h.fh.handle_bytes = sizeof(uint64_t);
  int mount_id;
  if (name_to_handle_at(AT_FDCWD, path.c_str(), &h.fh, &mount_id, 0) != 0) return 0;
  return h.id;
}

std::vector<std::string> hook_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> out;
    SockSkel sock;
    bpf_program* p;
    if (sock.opened()) bpf_object__for_each_program(p, sock->obj) out.push_back(bpf_program__name(p));
    return out;
  }();
  return names;
}

}  // namespace

std::vector<std::string> Datapath::missing_hooks() {
  std::vector<std::string> out;
  uint64_t want = cgroup_id(config_.hook_cgroup);
  for (const auto& name : hook_names()) {
    Fd link(bpf_obj_get(join(join(state_dir_, "links"), name).c_str()));
    bpf_link_info info{};
    __u32 len = sizeof(info);
    if (!link.valid() || bpf_obj_get_info_by_fd(link.get(), &info, &len) != 0 || info.cgroup.cgroup_id != want)
      out.push_back(name);
  }
  return out;
}

Status Datapath::repair_hooks() {
  auto lock = StateLock::take(state_dir_);
  if (!lock) return lock.error();
  PODSTEER_TRY(still_installed());
  auto missing = missing_hooks();
  if (missing.empty()) return {};
  SockSkel sock;
  if (!sock.opened()) return sys_error("open BPF skeleton");
  set_rodata(sock->rodata, config_);
  pin_maps_under(sock->obj, join(state_dir_, "maps"));
  if (int err = sock.load(); err) return Error{"load socket programs", -err, state_dir_};
  Fd cg(::open(config_.hook_cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!cg.valid()) return sys_error("open hook cgroup", config_.hook_cgroup);
  for (const auto& name : missing) {
    bpf_program* p = bpf_object__find_program_by_name(sock->obj, name.c_str());
    if (!p) continue;
    std::string pin = join(join(state_dir_, "links"), name);
    Fd old(bpf_obj_get(pin.c_str()));
    if (old.valid()) bpf_link_detach(old.get());
    unlink(pin.c_str());
    bpf_link* l = bpf_program__attach_cgroup(p, cg.get());
    if (!l) return sys_error(fmt::format("attach {} to cgroup", name), config_.hook_cgroup);
    int err = bpf_link__pin(l, pin.c_str());
    bpf_link__destroy(l);
    if (err) return Error{"pin cgroup link", -err, pin};
  }
  return {};
}

Status Datapath::upgrade_programs() {
  SockSkel sock;
  if (!sock.opened()) return sys_error("open BPF skeleton");
  set_rodata(sock->rodata, config_);
  pin_maps_under(sock->obj, join(state_dir_, "maps"));
  if (int err = sock.load(); err) return Error{"load the new socket programs", -err, state_dir_};

  std::string links = join(state_dir_, "links");
  std::set<std::string> current;
  bpf_program* p;
  bpf_object__for_each_program(p, sock->obj) {
    std::string name = bpf_program__name(p), pin = join(links, name);
    current.insert(name);
    Fd link(bpf_obj_get(pin.c_str()));
    if (link.valid()) {
      if (bpf_link_update(link.get(), bpf_program__fd(p), nullptr) != 0) return sys_error("bpf_link_update", pin);
      continue;
    }
    // a program this build has and the old one had not
    Fd cg(::open(config_.hook_cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!cg.valid()) return sys_error("open hook cgroup", config_.hook_cgroup);
    bpf_link* l = bpf_program__attach_cgroup(p, cg.get());
    if (!l) return sys_error(fmt::format("attach {} to cgroup", name), config_.hook_cgroup);
    int err = bpf_link__pin(l, pin.c_str());
    bpf_link__destroy(l);
    if (err) return Error{"pin cgroup link", -err, pin};
  }
  // a program the old build had and this one has not
  std::error_code ec;
  std::vector<std::string> gone;
  for (const auto& e : std::filesystem::directory_iterator(links, ec)) {
    if (current.count(e.path().filename().string())) continue;
    Fd link(bpf_obj_get(e.path().c_str()));
    if (link.valid()) bpf_link_detach(link.get());
    (void)remove_tree(e.path().string());
    gone.push_back(e.path().filename().string());
  }
  size_t pods = 0;
  for (const auto& e : std::filesystem::directory_iterator(join(state_dir_, "pods"), ec)) {
    uint64_t cookie = std::stoull(e.path().filename().string());
    PODSTEER_TRY(upgrade_inbound(cookie));
    ++pods;
  }
  config_.programs_id = programs_id();
  auto cfg = Map<__u32, podsteer_config>::open(map_pin(state_dir_, "podsteer_config"));
  if (!cfg) return cfg.error();
  PODSTEER_TRY(cfg->update(0, config_));
  if (gone.empty())
    spdlog::info("upgraded the programs in place: {} socket hooks, {} pod(s); no link was detached", current.size(), pods);
  else
    spdlog::info("upgraded the programs in place: {} socket hooks, {} pod(s); detached only what this build no longer has: {}",
                 current.size(), pods, fmt::join(gone, ", "));
  return {};
}

}  // namespace podsteer
