// Where the kernel's filesystems are: bpffs for our pins, cgroup v2 for the socket hooks.
#pragma once

#include <string>

#include "result.h"

namespace podsteer {

// cgroup v2 mount point from /proc/self/mountinfo (may be /sys/fs/cgroup/unified on
// hybrid systems).
Result<std::string> cgroup2_root();

// The kubelet's pods cgroup if present (kubepods.slice or kubepods), else the cgroup2 root.
Result<std::string> default_hook_cgroup();

Status check_cgroup2_dir(const std::string& dir);

// A cgroup v2 directory's id, as bpf_link_info and bpf_get_current_cgroup_id() report it;
// 0 when it cannot be had.
uint64_t cgroup_id(const std::string& path);

// DIR must be on bpffs; a missing DIR is fine when its parent is on bpffs.
Status check_bpffs(const std::string& dir);

bool path_exists(const std::string& path);

// Removes a directory tree of pins and directories (bpffs allows unlink and rmdir).
Status remove_tree(const std::string& dir);

}  // namespace podsteer
