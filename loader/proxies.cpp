// The node proxies trusted with the proxy mark (podsteer_proxy, see podsteer_abi.h): which
// process a pid is, by its cgroup v2 id, and the map's entries. The programs compare the
// cgroup of the process that connects or binds (steer.bpf.h: proxy_process).
#include <bpf/bpf.h>
#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "datapath.h"
#include "datapath_internal.h"
#include "log.h"
#include "system.h"

namespace podsteer {

namespace {

Result<Map<__u64, podsteer_proxy>> proxy_map(const std::string& state_dir) {
  return Map<__u64, podsteer_proxy>::open(map_pin(state_dir, "podsteer_proxy"));
}

// Field 22 of /proc/PID/stat (after the command, which may hold spaces and parentheses)
std::optional<uint64_t> start_time_of(uint32_t pid, const std::string& proc_root) {
  std::ifstream f(fmt::format("{}/{}/stat", proc_root, pid));
  std::string stat((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  auto close = stat.rfind(')');
  if (close == std::string::npos) return std::nullopt;
  std::istringstream rest(stat.substr(close + 2));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return std::stoull(field);
  return std::nullopt;
}

// Is pid listed in this cgroup's cgroup.procs?
bool lists(const std::string& dir, uint32_t pid) {
  std::ifstream f(dir + "/cgroup.procs");
  uint32_t p;
  while (f >> p)
    if (p == pid) return true;
  return false;
}

}  // namespace

Result<ProxyProcess> proxy_process_of(uint32_t pid, const std::string& proc_root) {
  if (pid == 0) return invalid("the node proxy's pid is not known (is it in another pid namespace? the agent runs with hostPID)");
  ProxyProcess p;
  p.pid = pid;
  auto start = start_time_of(pid, proc_root);
  if (!start) return invalid(fmt::format("no process {}", pid), proc_root, ErrorCode::kNotFound);
  p.start_time = *start;
  auto root = cgroup2_root();
  if (!root) return root.error();
  // The v2 line of /proc/PID/cgroup ("0::/path"), relative to our cgroup namespace's root
  std::ifstream f(fmt::format("{}/{}/cgroup", proc_root, pid));
  std::string line, rel;
  while (std::getline(f, line))
    if (line.rfind("0::", 0) == 0) rel = line.substr(3);
  if (!rel.empty() && rel.find("/..") == std::string::npos) {
    std::string dir = *root + rel;
    if (lists(dir, pid)) {
      p.cgroup = rel;
      p.cgroup_id = cgroup_id(dir);
    }
  }
  if (p.cgroup_id == 0) {
    // In a cgroup namespace of our own the path says nothing: find the cgroup that lists
    // the pid (the node's hierarchy is mounted at the cgroup2 root, and we share its pids)
    std::error_code ec;
    for (auto it = std::filesystem::recursive_directory_iterator(*root, ec);
         !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
      if (!it->is_directory(ec) || !lists(it->path().string(), pid)) continue;
      p.cgroup = it->path().string().substr(root->size());
      p.cgroup_id = cgroup_id(it->path().string());
      break;
    }
  }
  if (p.cgroup_id == 0)
    return invalid(fmt::format("no cgroup v2 under {} lists process {}", *root, pid), "", ErrorCode::kNotFound);
  if (p.cgroup.empty()) p.cgroup.push_back('/');
  return p;
}

Result<ProxyProcess> proxy_cgroup_of(const std::string& dir) {
  ProxyProcess p;
  p.cgroup = dir;
  p.cgroup_id = cgroup_id(dir);
  if (p.cgroup_id == 0) return sys_error("not a cgroup v2 directory", dir);
  return p;
}

bool still_running(const ProxyProcess& p, const std::string& proc_root) {
  if (p.pid == 0) return true;  // a cgroup trusted by hand: until it is forgotten
  auto start = start_time_of(p.pid, proc_root);
  if (!start || *start != p.start_time) return false;
  if (p.cgroup.empty()) return true;  // read back from the map: the id alone
  auto root = cgroup2_root();
  return root && lists(*root + (p.cgroup == "/" ? "" : p.cgroup), p.pid);
}

Status Datapath::trust_proxy(const ProxyProcess& p) {
  if (p.cgroup_id == PODSTEER_PROXY_ANY) return invalid("a proxy's cgroup id cannot be 0");
  auto m = proxy_map(state_dir_);
  if (!m) return m.error();
  podsteer_proxy v{};
  v.pid = p.pid;
  v.start_time = p.start_time;
  return m->update(p.cgroup_id, v);
}

Status Datapath::forget_proxy(uint64_t cgroup_id) {
  auto m = proxy_map(state_dir_);
  if (!m) return m.error();
  return m->erase(cgroup_id);
}

Result<std::vector<ProxyProcess>> Datapath::proxies() const {
  auto m = proxy_map(state_dir_);
  if (!m) return m.error();
  auto keys = m->keys();
  if (!keys) return keys.error();
  std::vector<ProxyProcess> out;
  for (auto k : *keys) {
    if (k == PODSTEER_PROXY_ANY) continue;
    auto v = m->lookup(k);
    if (!v || !v->has_value()) continue;
    ProxyProcess p;
    p.cgroup_id = k;
    p.pid = (*v)->pid;
    p.start_time = (*v)->start_time;
    out.push_back(p);
  }
  return out;
}

Status Datapath::set_proxy_identity(NodeConfig::ProxyIdentity mode) {
  auto m = proxy_map(state_dir_);
  if (!m) return m.error();
  if (mode == NodeConfig::ProxyIdentity::Mark) return m->update(PODSTEER_PROXY_ANY, podsteer_proxy{});
  return m->erase(PODSTEER_PROXY_ANY);
}

NodeConfig::ProxyIdentity Datapath::proxy_identity() const {
  auto m = proxy_map(state_dir_);
  if (!m) return NodeConfig::ProxyIdentity::Mark;  // a state without the map: the mark alone, as its programs do
  auto v = m->lookup(PODSTEER_PROXY_ANY);
  return v && v->has_value() ? NodeConfig::ProxyIdentity::Mark : NodeConfig::ProxyIdentity::Process;
}

}  // namespace podsteer
