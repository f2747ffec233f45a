#include "kernel_features.h"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/utsname.h>

#include <cstdlib>
#include <sstream>
#include <set>

#include <fmt/format.h>

#include "netns.h"
#include "system.h"

namespace podsteer {
namespace {

std::set<std::string> pretend_missing() {
  std::set<std::string> out;
  const char* env = std::getenv("PODSTEER_PRETEND_MISSING");
  if (!env) return out;
  std::stringstream ss(env);
  std::string item;
  while (std::getline(ss, item, ',')) out.insert(item);
  return out;
}

bool helper_ok(bpf_prog_type t, bpf_func_id f) { return libbpf_probe_bpf_helper(t, f, nullptr) == 1; }

struct Probe {
  const char* name;
  bool required;
  const char* why;
  bool (*run)(std::string& detail);
};

bool kernel_version(std::string& detail) {
  utsname u{};
  uname(&u);
  int major = 0, minor = 0;
  sscanf(u.release, "%d.%d", &major, &minor);
  detail = u.release;
  return major > 5 || (major == 5 && minor >= 15);
}

bool netns_cookie_sockopt(std::string& detail) {
  auto c = current_netns_cookie();
  if (!c) {
    detail = c.error().message();
    return false;
  }
  detail = fmt::format("this netns has cookie {}", *c);
  return true;
}

bool btf(std::string& detail) {
  bool ok = path_exists("/sys/kernel/btf/vmlinux");
  detail = ok ? "/sys/kernel/btf/vmlinux" : "no /sys/kernel/btf/vmlinux";
  return ok;
}

bool cgroup2(std::string& detail) {
  auto r = cgroup2_root();
  detail = r ? *r : r.error().message();
  return r.ok();
}

#define PROG_TYPE(T) +[](std::string& d) { d = #T; return libbpf_probe_bpf_prog_type(T, nullptr) == 1; }
#define MAP_TYPE(T) +[](std::string& d) { d = #T; return libbpf_probe_bpf_map_type(T, nullptr) == 1; }
#define HELPER(T, F) +[](std::string& d) { d = #F " in " #T; return helper_ok(T, F); }

const Probe kProbes[] = {
    {"kernel", true, "podsteer needs Linux 5.15 or newer (tested: 6.1, 6.12, 6.18)", kernel_version},
    {"cgroup2", true, "the socket hooks attach to a cgroup v2 directory", cgroup2},
    {"btf", false, "kernel BTF: finding a proxy that listened before its pod was enrolled, and readable bpftool output",
     btf},
    {"so_netns_cookie", true, "pods are keyed by netns cookie (SO_NETNS_COOKIE, 5.14+)", netns_cookie_sockopt},
    {"prog_sk_lookup", true, "inbound capture is an sk_lookup program in each pod's netns (5.9+)",
     PROG_TYPE(BPF_PROG_TYPE_SK_LOOKUP)},
    {"sk_lookup_assign", true, "sk_lookup hands new inbound connections to the proxy's listener",
     HELPER(BPF_PROG_TYPE_SK_LOOKUP, BPF_FUNC_sk_assign)},
    {"prog_sock_addr", true, "outbound capture uses cgroup connect/sendmsg/recvmsg/getpeername hooks",
     PROG_TYPE(BPF_PROG_TYPE_CGROUP_SOCK_ADDR)},
    {"prog_sock_ops", true, "sock_ops records original destinations and the proxy's listeners",
     PROG_TYPE(BPF_PROG_TYPE_SOCK_OPS)},
    {"prog_sockopt", true, "the proxy's SO_ORIGINAL_DST is answered by a cgroup getsockopt program",
     PROG_TYPE(BPF_PROG_TYPE_CGROUP_SOCKOPT)},
    {"map_lpm_trie", true, "excluded CIDRs are an LPM trie", MAP_TYPE(BPF_MAP_TYPE_LPM_TRIE)},
    {"map_sk_storage", true, "each captured socket keeps its original destination in socket storage",
     MAP_TYPE(BPF_MAP_TYPE_SK_STORAGE)},
    {"map_sockhash", true, "the proxy's inbound listeners live in a SOCKHASH", MAP_TYPE(BPF_MAP_TYPE_SOCKHASH)},
    {"map_percpu_hash", true, "per-pod counters are per-CPU", MAP_TYPE(BPF_MAP_TYPE_PERCPU_HASH)},
    {"sock_addr_netns_cookie", true, "socket hooks act only in enrolled pods' netns",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_get_netns_cookie)},
    {"sock_addr_sk_storage", true, "connect remembers the original destination on the socket",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_sk_storage_get)},
    {"sock_addr_sk_lookup", true, "connect checks whether the proxy is listening (fail open)",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_sk_lookup_tcp)},
    {"sock_ops_sk_storage", true, "sock_ops reads the original destination from the socket",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_sk_storage_get)},
    {"sock_ops_netns_cookie", true, "sock_ops keys original destinations and listeners by netns (6.1: yes, 5.10: no)",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_get_netns_cookie)},
    {"sock_ops_sock_hash_update", true, "sock_ops puts the proxy's listeners into the SOCKHASH",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_sock_hash_update)},
    {"sock_ops_setsockopt", true, "sock_ops gives the proxy's connection from a client's address the app mark",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_setsockopt)},
    {"sockopt_netns_cookie", true, "getsockopt answers only in enrolled pods' netns",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_FUNC_get_netns_cookie)},
    {"sock_addr_socket_cookie", true, "connect4/6 key the original destination they hand to sock_ops by socket",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_get_socket_cookie)},
    {"sock_ops_percpu_elem", true, "sock_ops finds an original destination on another CPU's ring after a migration (5.19+)",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_map_lookup_percpu_elem)},
    {"sock_ops_loop", true, "sock_ops walks the CPUs' rings with bpf_loop (5.17+)",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_loop)},
};

}  // namespace

std::vector<FeatureCheck> probe_features(const std::string& state_dir) {
  auto missing = pretend_missing();
  std::vector<FeatureCheck> out;
  {
    FeatureCheck c{"bpffs", true, true, state_dir, "pins keep the datapath alive when no podsteer process runs"};
    auto st = check_bpffs(state_dir);
    c.ok = st.ok() && !missing.count("bpffs");
    if (!st) c.detail = st.error().message();
    out.push_back(c);
  }
  for (const auto& p : kProbes) {
    FeatureCheck c{p.name, false, p.required, "", p.why};
    c.ok = p.run(c.detail);
    if (missing.count(p.name)) {
      c.ok = false;
      c.detail += " (reported missing by PODSTEER_PRETEND_MISSING)";
    }
    out.push_back(c);
  }
  return out;
}

bool feature_ok(const std::string& name) {
  if (pretend_missing().count(name)) return false;
  for (const auto& p : kProbes) {
    if (name == p.name) {
      std::string d;
      return p.run(d);
    }
  }
  return false;
}

}  // namespace podsteer
