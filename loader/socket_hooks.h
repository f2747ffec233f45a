// The socket hooks (bpf/sock.bpf.c): loaded once per node, attached at the hook cgroup by
// links pinned under links/. The only owner of their skeleton: install, upgrade and
// repair all go through the same two phases, each returning an error value:
//
//   load()    open the object, write the node's settings into .rodata, reuse the pinned
//             maps (or pin new ones), load into the kernel
//   attach()  per program: a pinned link still attached at the hook cgroup is switched to
//             the loaded program in place (bpf_link_update: no socket sees a gap); a missing,
//             detached or misplaced one is made anew and pinned
//
// How the programs are configured, in one place: the node's ports and marks are .rodata
// (constants the verifier folds: no lookup per call), written from the pinned
// podsteer_config at every load; podsteer_config itself is also a map, read by the CLI and
// the agent (and written last by install: its presence marks a complete install); the
// programs loaded once per pod (sk_lookup, TC) take the pod's netns cookie (and the node's
// netns id) as a patched instruction (lookup_cookie.h), so no pod gets a .rodata map.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "podsteer_abi.h"
#include "result.h"

struct bpf_object;

namespace podsteer {

class SocketHooks {
 public:
  static Result<SocketHooks> load(const std::string& state_dir, const podsteer_config& cfg);
  SocketHooks(SocketHooks&&) noexcept;
  SocketHooks& operator=(SocketHooks&&) noexcept;
  ~SocketHooks();

  // only: the programs to attach (empty: all). Returns how many links were made anew.
  Result<size_t> attach(const std::string& hook_cgroup, const std::vector<std::string>& only = {});
  // Links under links/ of programs this build does not have: detached and unpinned.
  std::vector<std::string> drop_stale_links();
  bpf_object* object();

  // The programs' names (the link pins' names).
  static const std::vector<std::string>& names();
  // The programs not attached at hook_cgroup by a link pinned in state_dir.
  static std::vector<std::string> missing(const std::string& state_dir, const std::string& hook_cgroup);
  // Every link pinned under dir (recursively) is detached: the programs stop at once,
  // even while something else still holds the link.
  static void detach_pinned_links(const std::string& dir);

 private:
  struct Impl;
  explicit SocketHooks(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace podsteer
