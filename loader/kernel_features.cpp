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

constexpr int kTcxIngress = 46;  // BPF_TCX_INGRESS, newer than Debian's UAPI headers

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

bool tcx(std::string& detail) {
  // Read-only probe: query tcx attachments of the loopback device. Kernels without
  // tcx reject the attach type with EINVAL.
  __u32 cnt = 0;
  int err = bpf_prog_query(1 /* lo */, static_cast<bpf_attach_type>(kTcxIngress), 0, nullptr, nullptr, &cnt);
  if (err == 0) {
    detail = "tcx links (6.6+)";
    return true;
  }
  detail = "no tcx: TC programs are attached with clsact + cls_bpf instead";
  return false;
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
    {"kernel", true, "podsteer needs Linux 5.15 or newer", kernel_version},
    {"cgroup2", true, "the socket hooks attach to a cgroup v2 directory", cgroup2},
    {"btf", false, "kernel BTF is not needed to load, but bpftool shows more with it", btf},
    {"so_netns_cookie", true, "pods are keyed by netns cookie (SO_NETNS_COOKIE, 5.14+)", netns_cookie_sockopt},
    {"prog_sched_cls", true, "inbound capture is a TC program", PROG_TYPE(BPF_PROG_TYPE_SCHED_CLS)},
    {"prog_sock_addr", true, "outbound capture uses cgroup connect/sendmsg/recvmsg/getpeername hooks",
     PROG_TYPE(BPF_PROG_TYPE_CGROUP_SOCK_ADDR)},
    {"prog_sock_ops", true, "sock_ops records original destinations for SO_ORIGINAL_DST",
     PROG_TYPE(BPF_PROG_TYPE_SOCK_OPS)},
    {"prog_sockopt", true, "the proxy's SO_ORIGINAL_DST is answered by a cgroup getsockopt program",
     PROG_TYPE(BPF_PROG_TYPE_CGROUP_SOCKOPT)},
    {"map_lpm_trie", true, "excluded CIDRs are an LPM trie", MAP_TYPE(BPF_MAP_TYPE_LPM_TRIE)},
    {"map_sk_storage", true, "each captured socket keeps its original destination in socket storage",
     MAP_TYPE(BPF_MAP_TYPE_SK_STORAGE)},
    {"map_lru_hash", true, "original destinations for the proxy live in an LRU hash", MAP_TYPE(BPF_MAP_TYPE_LRU_HASH)},
    {"map_percpu_hash", true, "per-pod counters are per-CPU", MAP_TYPE(BPF_MAP_TYPE_PERCPU_HASH)},
    {"sk_assign", true, "inbound connections are handed to the inbound listener with bpf_sk_assign (5.7+)",
     HELPER(BPF_PROG_TYPE_SCHED_CLS, BPF_FUNC_sk_assign)},
    {"tc_skc_lookup", true, "TC finds the inbound listener with bpf_skc_lookup_tcp",
     HELPER(BPF_PROG_TYPE_SCHED_CLS, BPF_FUNC_skc_lookup_tcp)},
    {"sock_addr_netns_cookie", true, "socket hooks act only in enrolled pods' netns",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_get_netns_cookie)},
    {"sock_addr_sk_storage", true, "connect remembers the original destination on the socket",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_sk_storage_get)},
    {"sock_addr_sk_lookup", true, "connect checks whether the proxy is listening (fail open/closed)",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_FUNC_sk_lookup_tcp)},
    {"sock_ops_sk_storage", true, "sock_ops reads the original destination from the socket",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_sk_storage_get)},
    {"sock_ops_netns_cookie", true, "sock_ops keys original destinations by netns",
     HELPER(BPF_PROG_TYPE_SOCK_OPS, BPF_FUNC_get_netns_cookie)},
    {"sockopt_netns_cookie", true, "getsockopt answers only in enrolled pods' netns",
     HELPER(BPF_PROG_TYPE_CGROUP_SOCKOPT, BPF_FUNC_get_netns_cookie)},
    {"tcx", false, "tcx links (6.6+) coexist with other TC programs by design; without them clsact is used",
     tcx},
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
