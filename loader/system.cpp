#include "system.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#ifndef BPF_FS_MAGIC
#define BPF_FS_MAGIC 0xcafe4a11
#endif
#ifndef CGROUP2_SUPER_MAGIC
#define CGROUP2_SUPER_MAGIC 0x63677270
#endif

namespace podsteer {

Result<std::string> cgroup2_root() {
  std::ifstream in("/proc/self/mountinfo");
  if (!in) return sys_error("open", "/proc/self/mountinfo");
  std::string line;
  while (std::getline(in, line)) {
    // ... mount_point ... - fstype source options
    auto dash = line.find(" - ");
    if (dash == std::string::npos) continue;
    std::istringstream tail(line.substr(dash + 3));
    std::string fstype;
    tail >> fstype;
    if (fstype != "cgroup2") continue;
    std::istringstream head(line.substr(0, dash));
    std::string id, parent, devno, root, mount_point;
    head >> id >> parent >> devno >> root >> mount_point;
    return mount_point;
  }
  return invalid("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)");
}

Result<std::string> default_hook_cgroup() {
  auto root = cgroup2_root();
  if (!root) return root.error();
  for (const char* name : {"kubepods.slice", "kubepods"}) {
    std::string p = *root + "/" + name;
    if (path_exists(p)) return p;
  }
  return *root;
}

Status check_cgroup2_dir(const std::string& dir) {
  struct statfs fs {};
  if (statfs(dir.c_str(), &fs) != 0) return sys_error("statfs", dir);
  if (fs.f_type != CGROUP2_SUPER_MAGIC) return invalid("not a cgroup v2 directory", dir);
  return {};
}

Status check_bpffs(const std::string& dir) {
  std::string probe = dir;
  if (!path_exists(probe)) probe = std::filesystem::path(dir).parent_path().string();
  struct statfs fs {};
  if (statfs(probe.c_str(), &fs) != 0) return sys_error("statfs", probe);
  if (fs.f_type != BPF_FS_MAGIC)
    return invalid("not on a bpf filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)", dir);
  return {};
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return lstat(path.c_str(), &st) == 0;
}

Status remove_tree(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  if (ec) return Error{"remove", ec.value(), dir};
  return {};
}

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

}  // namespace podsteer
