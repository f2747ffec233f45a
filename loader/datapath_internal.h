// Helpers shared by the loader's files; not part of its interface.
#pragma once

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "fd.h"
#include "podsteer_abi.h"
#include "result.h"
#include "state_dir.h"

struct bpf_object;

namespace podsteer::detail {

// Removes a pod's TC hooks (inbound.cpp): tcx links by their pins; cls_bpf filters in the
// pod's netns (netns_fd), only while they still run our program (-1: the netns is gone,
// and its filters with it). Their pins go too.
void detach_node_in_hooks(const std::string& state_dir, uint64_t cookie, int netns_fd);

inline void copy_str(char* dst, size_t cap, const std::string& s) {
  std::memset(dst, 0, cap);
  std::memcpy(dst, s.data(), std::min(cap - 1, s.size()));
}

inline std::string str_of(const char* field, size_t cap) { return std::string(field, strnlen(field, cap)); }

// Steps already taken, undone in reverse unless commit() is called.
class Rollback {
 public:
  ~Rollback() {
    if (committed_) return;
    for (auto it = undo_.rbegin(); it != undo_.rend(); ++it) (*it)();
  }
  void add(std::function<void()> f) { undo_.push_back(std::move(f)); }
  void commit() { committed_ = true; }

 private:
  std::vector<std::function<void()>> undo_;
  bool committed_ = false;
};

uint32_t prog_id_of(int prog_fd);

// The kernel's description of the link pinned at pin; nullopt when none is pinned there.
std::optional<bpf_link_info> pinned_link_info(const std::string& pin);

// Every non-internal map of obj is reused from (or pinned at) maps_dir/<name>.
void pin_maps_under(bpf_object* obj, const std::string& maps_dir);

// The node's settings into a skeleton's .rodata (every object has the same cfg_* set).
template <typename Rodata>
void set_rodata(Rodata* ro, const podsteer_config& c) {
  ro->cfg_outbound_port = c.outbound_port;
  ro->cfg_inbound_port = c.inbound_port;
  ro->cfg_hbone_port = c.hbone_port;
  ro->cfg_dns_port = c.dns_port;
  ro->cfg_proxy_mark = c.proxy_mark;
  ro->cfg_proxy_mark_mask = c.proxy_mark_mask;
  ro->cfg_app_mark = c.app_mark;
  int cpus = libbpf_num_possible_cpus();
  ro->cfg_nr_cpus = cpus > 0 ? static_cast<uint32_t>(cpus) : 1;
}
uint64_t now_ns();

}  // namespace podsteer::detail
