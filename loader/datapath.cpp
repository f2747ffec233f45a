#include "datapath.h"

#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "kernel_features.h"
#include "log.h"
#include "podsteer_sock.skel.h"
#include "podsteer_tc.skel.h"
#include "skeleton.h"
#include "system.h"

namespace podsteer {
namespace {

constexpr int kTcxIngress = 46;  // BPF_TCX_INGRESS (6.6+), absent from Debian's UAPI headers
constexpr uint32_t kClsactHandle = 0x5053;  // "PS"
constexpr uint32_t kClsactFirstPrio = 0xc000;

using SockSkel = Skeleton<podsteer_sock, podsteer_sock__open, podsteer_sock__load, podsteer_sock__destroy>;
using TcSkel = Skeleton<podsteer_tc, podsteer_tc__open, podsteer_tc__load, podsteer_tc__destroy>;

std::string join(const std::string& a, const std::string& b) { return a + "/" + b; }

Status make_dir(const std::string& p) {
  if (mkdir(p.c_str(), 0700) != 0 && errno != EEXIST) return sys_error("mkdir", p);
  return {};
}

// Every mutating command holds an exclusive lock on the state dir's parent, so two
// podsteer processes never interleave their steps.
class StateLock {
 public:
  static Result<StateLock> take(const std::string& state_dir) {
    std::string parent = std::filesystem::path(state_dir).parent_path().string();
    Fd fd(open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd.valid()) return sys_error("open", parent);
    if (flock(fd.get(), LOCK_EX) != 0) return sys_error("flock", parent);
    return StateLock(std::move(fd));
  }

 private:
  explicit StateLock(Fd fd) : fd_(std::move(fd)) {}
  Fd fd_;
};

template <typename Skel>
void pin_maps_under(bpf_object* obj, const std::string& maps_dir) {
  bpf_map* m;
  bpf_object__for_each_map(m, obj) {
    if (bpf_map__is_internal(m)) continue;  // .rodata is per object, not shared
    bpf_map__set_pin_path(m, join(maps_dir, bpf_map__name(m)).c_str());
  }
}

template <typename Rodata>
void set_rodata(Rodata* ro, const NodeConfig& c) {
  ro->cfg_outbound_port = c.outbound_port;
  ro->cfg_inbound_port = c.inbound_port;
  ro->cfg_hbone_port = c.hbone_port;
  ro->cfg_dns_port = c.dns_port;
  ro->cfg_proxy_mark = c.proxy_mark;
  ro->cfg_proxy_mark_mask = c.proxy_mark_mask;
}

uint32_t prog_id(int fd) {
  bpf_prog_info info{};
  __u32 len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return 0;
  return info.id;
}

std::string pod_dir(const std::string& state, uint64_t cookie) {
  return join(join(state, "pods"), std::to_string(cookie));
}

uint64_t now_ns() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return uint64_t(ts.tv_sec) * 1000000000ull + ts.tv_nsec;
}

void copy_str(char* dst, size_t cap, const std::string& s) {
  std::memset(dst, 0, cap);
  std::memcpy(dst, s.data(), std::min(cap - 1, s.size()));
}

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

}  // namespace

const std::vector<std::string>& map_names() {
  static const std::vector<std::string> names = {
      "podsteer_pods",     "podsteer_ips", "podsteer_meta", "podsteer_ports",      "podsteer_cidrs",
      "podsteer_stats",    "podsteer_orig",  "podsteer_skorig", "podsteer_config"};
  return names;
}

std::string map_pin(const std::string& state_dir, const std::string& name) {
  return join(join(state_dir, "maps"), name);
}

// Splits on commas, keeping empty items ("80," has two) so they can be rejected.
std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t comma = list.find(',', start);
    out.push_back(list.substr(start, comma - start));
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

Result<std::vector<uint16_t>> parse_ports(const std::string& list) {
  std::vector<uint16_t> out;
  if (list.empty()) return out;
  for (const auto& item : split_list(list)) {
    if (item.empty() || item.size() > 5 || !std::all_of(item.begin(), item.end(), ::isdigit))
      return invalid(fmt::format("bad port '{}' in '{}': expected numbers 1-65535 separated by commas", item, list));
    unsigned long v = std::stoul(item);
    if (v == 0 || v > 65535)
      return invalid(fmt::format("port {} out of range 1-65535 in '{}'", item, list));
    out.push_back(static_cast<uint16_t>(v));
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

Result<Cidr> parse_cidr(const std::string& text) {
  Cidr c;
  c.text = text;
  auto slash = text.find('/');
  std::string addr = text.substr(0, slash);
  std::string len = slash == std::string::npos ? "" : text.substr(slash + 1);
  in_addr a4{};
  in6_addr a6{};
  unsigned max_len;
  if (inet_pton(AF_INET, addr.c_str(), &a4) == 1) {
    c.addr[10] = c.addr[11] = 0xff;
    std::memcpy(c.addr + 12, &a4, 4);
    max_len = 32;
  } else if (inet_pton(AF_INET6, addr.c_str(), &a6) == 1) {
    std::memcpy(c.addr, &a6, 16);
    max_len = 128;
  } else {
    return invalid(fmt::format("bad CIDR '{}': '{}' is not an IPv4 or IPv6 address", text, addr));
  }
  unsigned plen = max_len;
  if (slash != std::string::npos) {
    if (len.empty() || len.size() > 3 || !std::all_of(len.begin(), len.end(), ::isdigit) ||
        std::stoul(len) > max_len)
      return invalid(fmt::format("bad CIDR '{}': prefix length must be 0-{}", text, max_len));
    plen = std::stoul(len);
  }
  c.prefix = plen + (max_len == 32 ? 96 : 0);
  // clear host bits, so equal networks give equal keys
  for (unsigned bit = c.prefix; bit < 128; ++bit) c.addr[bit / 8] &= ~(0x80 >> (bit % 8));
  return c;
}

Result<std::vector<Cidr>> parse_cidrs(const std::string& list) {
  std::vector<Cidr> out;
  if (list.empty()) return out;
  for (const auto& item : split_list(list)) {
    auto c = parse_cidr(item);
    if (!c) return c.error();
    out.push_back(*c);
  }
  return out;
}

podsteer_cidr_key cidr_key(uint64_t cookie, const Cidr& c) {
  podsteer_cidr_key k{};
  k.prefixlen = PODSTEER_CIDR_COOKIE_BITS + c.prefix;
  k.netns_cookie_hi = htonl(uint32_t(cookie >> 32));
  k.netns_cookie_lo = htonl(uint32_t(cookie));
  std::memcpy(k.addr, c.addr, 16);
  return k;
}

// ---------------------------------------------------------------------------------------
// install / adopt / uninstall

Status Datapath::install(const std::string& state_dir, const NodeConfig& want) {
  for (const auto& f : probe_features(state_dir)) {
    if (f.required && !f.ok)
      return invalid(fmt::format("kernel feature missing: {} ({}): {}. Run `podsteer doctor`.", f.name,
                                 f.detail, f.why));
  }
  std::string hook = want.hook_cgroup;
  if (hook.empty()) {
    auto d = default_hook_cgroup();
    if (!d) return d.error();
    hook = *d;
  }
  PODSTEER_TRY(check_cgroup2_dir(hook));
  if (hook.size() >= PODSTEER_PATH_LEN) return invalid("hook cgroup path too long", hook);

  bool ok = false;
  PODSTEER_TRY(make_dir(state_dir));
  // Any failure from here removes what was made, so nothing is left half-installed.
  struct Cleanup {
    const std::string& dir;
    bool& ok;
    ~Cleanup() {
      if (!ok) (void)Datapath::remove_all(dir);
    }
  } cleanup{state_dir, ok};
  for (const char* sub : {"maps", "progs", "links", "pods"}) PODSTEER_TRY(make_dir(join(state_dir, sub)));
  const std::string maps_dir = join(state_dir, "maps");

  SockSkel sock;
  TcSkel tc;
  if (!sock.opened() || !tc.opened()) return sys_error("open BPF skeleton");
  set_rodata(sock->rodata, want);
  set_rodata(tc->rodata, want);
  pin_maps_under<podsteer_sock>(sock->obj, maps_dir);
  pin_maps_under<podsteer_tc>(tc->obj, maps_dir);
  if (int err = sock.load(); err) return Error{"load socket programs (run with -v for the verifier log)", -err, state_dir};
  if (int err = tc.load(); err) return Error{"load TC program (run with -v for the verifier log)", -err, state_dir};

  if (bpf_program__pin(tc->progs.podsteer_tc_ingress, join(join(state_dir, "progs"), "tc_ingress").c_str()) != 0)
    return sys_error("pin TC program", state_dir);

  Fd cg(::open(hook.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!cg.valid()) return sys_error("open hook cgroup", hook);
  bpf_program* p;
  bpf_object__for_each_program(p, sock->obj) {
    bpf_link* link = bpf_program__attach_cgroup(p, cg.get());
    if (!link) return sys_error(fmt::format("attach {} to cgroup", bpf_program__name(p)), hook);
    int err = bpf_link__pin(link, join(join(state_dir, "links"), bpf_program__name(p)).c_str());
    bpf_link__destroy(link);  // the pin holds the link from here on
    if (err) return Error{"pin cgroup link", -err, bpf_program__name(p)};
  }

  // The config entry is written last: it marks the install complete.
  podsteer_config cfg{};
  cfg.abi_version = PODSTEER_ABI_VERSION;
  cfg.outbound_port = want.outbound_port;
  cfg.inbound_port = want.inbound_port;
  cfg.hbone_port = want.hbone_port;
  cfg.dns_port = want.dns_port;
  cfg.proxy_mark = want.proxy_mark;
  cfg.proxy_mark_mask = want.proxy_mark_mask;
  copy_str(cfg.hook_cgroup, sizeof(cfg.hook_cgroup), hook);
  __u32 zero = 0;
  if (bpf_map_update_elem(bpf_map__fd(sock->maps.podsteer_config), &zero, &cfg, BPF_ANY) != 0)
    return sys_error("write podsteer_config", state_dir);
  spdlog::info("installed datapath in {} (socket hooks at {})", state_dir, hook);
  ok = true;
  return {};
}

Status Datapath::adopt() {
  auto cfg_map = Map<__u32, podsteer_config>::open(map_pin(state_dir_, "podsteer_config"));
  if (!cfg_map) return cfg_map.error();
  auto cfg = cfg_map->lookup(0);
  if (!cfg) return cfg.error();
  if (!cfg->has_value() || (*cfg)->abi_version == 0)
    return invalid("state dir holds an incomplete install", state_dir_);
  config_ = **cfg;
  if (config_.abi_version != PODSTEER_ABI_VERSION)
    return invalid(fmt::format("state dir was made with map ABI {}, this podsteer uses {}; run `podsteer "
                               "uninstall` with the old version, then enroll again",
                               config_.abi_version, PODSTEER_ABI_VERSION),
                   state_dir_);
  auto pods = Map<__u64, podsteer_pod>::open(map_pin(state_dir_, "podsteer_pods"));
  if (!pods) return pods.error();
  auto meta = Map<__u64, podsteer_pod_meta>::open(map_pin(state_dir_, "podsteer_meta"));
  if (!meta) return meta.error();
  auto ips = Map<podsteer_ip_key, __u64>::open(map_pin(state_dir_, "podsteer_ips"));
  if (!ips) return ips.error();
  auto ports = Map<podsteer_port_key, __u8>::open(map_pin(state_dir_, "podsteer_ports"));
  if (!ports) return ports.error();
  auto cidrs = Map<podsteer_cidr_key, __u8>::open(map_pin(state_dir_, "podsteer_cidrs"));
  if (!cidrs) return cidrs.error();
  auto stats = PercpuMap<__u64, podsteer_counters>::open(map_pin(state_dir_, "podsteer_stats"));
  if (!stats) return stats.error();
  pods_.emplace(std::move(*pods));
  meta_.emplace(std::move(*meta));
  pod_ips_.emplace(std::move(*ips));
  ports_.emplace(std::move(*ports));
  cidrs_.emplace(std::move(*cidrs));
  stats_.emplace(std::move(*stats));
  std::string tc_pin = join(join(state_dir_, "progs"), "tc_ingress");
  tc_prog_ = Fd(bpf_obj_get(tc_pin.c_str()));
  if (!tc_prog_.valid()) return sys_error("bpf_obj_get", tc_pin);
  tc_prog_id_ = prog_id(tc_prog_.get());
  return {};
}

Result<Datapath> Datapath::open(const std::string& state_dir, const NodeConfig& want, bool install_if_missing) {
  PODSTEER_TRY(check_bpffs(state_dir));
  auto lock = StateLock::take(state_dir);
  if (!lock) return lock.error();
  Datapath dp;
  dp.state_dir_ = state_dir;
  bool installed = path_exists(map_pin(state_dir, "podsteer_config"));
  if (installed) {
    auto st = dp.adopt();
    if (!st && st.error().op.find("incomplete install") != std::string::npos && install_if_missing) {
      spdlog::warn("{}: removing an incomplete install left by an interrupted podsteer", state_dir);
      PODSTEER_TRY(remove_all(state_dir));
      installed = false;
    } else if (!st) {
      return st.error();
    }
  }
  if (!installed) {
    if (!install_if_missing)
      return invalid("no podsteer datapath installed here (enroll a pod first)", state_dir);
    PODSTEER_TRY(install(state_dir, want));
    PODSTEER_TRY(dp.adopt());
  }
  if (!want.hook_cgroup.empty() && want.hook_cgroup != dp.config_.hook_cgroup)
    return invalid(fmt::format("the state dir's socket hooks are at {}, not {}: the hook cgroup is chosen when "
                               "the state dir is made (run `podsteer uninstall` to change it)",
                               dp.config_.hook_cgroup, want.hook_cgroup),
                   state_dir);
  return dp;
}

Status Datapath::uninstall(const std::string& state_dir) {
  if (!path_exists(state_dir)) return {};
  PODSTEER_TRY(check_bpffs(state_dir));
  auto lock = StateLock::take(state_dir);
  if (!lock) return lock.error();
  return remove_all(state_dir);
}

Status Datapath::remove_all(const std::string& state_dir) {
  // Pods first, through the maps if they can be read; a pod's tcx links are pins below
  // pods/ and go with the tree even if the maps cannot.
  {
    Datapath dp;
    dp.state_dir_ = state_dir;
    if (dp.adopt().ok()) {
      auto pods = dp.meta_->keys();
      if (pods) {
        for (auto cookie : *pods) {
          auto st = dp.unenroll(cookie);
          if (!st) spdlog::warn("uninstall: pod {}: {}", cookie, st.error().message());
        }
      }
    }
  }
  std::error_code ec;
  for (const char* sub : {"pods", "links"}) {
    for (auto it = std::filesystem::recursive_directory_iterator(join(state_dir, sub), ec);
         !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
      if (it->is_directory()) continue;
      Fd link(bpf_obj_get(it->path().c_str()));
      if (link.valid() && bpf_link_detach(link.get()) != 0 && errno != ENOLINK)
        spdlog::debug("detach {}: {}", it->path().string(), std::strerror(errno));
    }
  }
  PODSTEER_TRY(remove_tree(state_dir));
  return {};
}

// ---------------------------------------------------------------------------------------
// per pod

Status Datapath::attach_tc(const Netns& ns, const std::vector<unsigned>& ifindexes, TcMode mode,
                           podsteer_pod_meta& meta) {
  bool use_tcx = mode == TcMode::Tcx || (mode == TcMode::Auto && feature_ok("tcx"));
  if (mode == TcMode::Tcx && !feature_ok("tcx")) return invalid("this kernel has no tcx (6.6+): use --tc-mode clsact");
  meta.attach_mode = use_tcx ? PODSTEER_ATTACH_TCX : PODSTEER_ATTACH_CLSACT;
  std::string dir = pod_dir(state_dir_, ns.cookie);
  PODSTEER_TRY(make_dir(dir));
  meta.n_ifaces = 0;
  int prog = tc_prog_.get();
  Status st = in_netns(ns.fd.get(), [&]() -> Status {
    for (unsigned ifindex : ifindexes) {
      size_t i = meta.n_ifaces;
      if (use_tcx) {
        Fd link(bpf_link_create(prog, ifindex, static_cast<bpf_attach_type>(kTcxIngress), nullptr));
        if (!link.valid()) return sys_error(fmt::format("attach tcx ingress on ifindex {}", ifindex), ns.path);
        std::string pin = join(dir, fmt::format("tc_{}", ifindex));
        if (bpf_obj_pin(link.get(), pin.c_str()) != 0) {
          auto e = sys_error("pin tcx link", pin);
          bpf_link_detach(link.get());
          return e;
        }
      } else {
        bpf_tc_hook hook{};
        hook.sz = sizeof(hook);
        hook.ifindex = ifindex;
        hook.attach_point = BPF_TC_INGRESS;
        int err = bpf_tc_hook_create(&hook);
        if (err && err != -EEXIST) return Error{"create clsact qdisc", -err, ns.path};
        // Never replace a filter that is not ours: take the first free priority.
        uint32_t prio = kClsactFirstPrio;
        for (;; ++prio) {
          bpf_tc_opts opts{};
          opts.sz = sizeof(opts);
          opts.prog_fd = prog;
          opts.handle = kClsactHandle;
          opts.priority = prio;
          err = bpf_tc_attach(&hook, &opts);
          if (err == 0) break;
          // EEXIST: a filter of ours-or-not has this handle; EINVAL: another protocol's
          // filter holds the priority. Either way the priority is someone else's.
          if ((err != -EEXIST && err != -EINVAL) || prio > kClsactFirstPrio + 64)
            return Error{fmt::format("attach cls_bpf on ifindex {}", ifindex), -err, ns.path};
        }
        meta.tc_prio[i] = prio;
        meta.tc_handle[i] = kClsactHandle;
      }
      meta.ifindex[i] = ifindex;
      meta.n_ifaces++;
    }
    return {};
  });
  return st;
}

void Datapath::detach_tc(uint64_t cookie, const podsteer_pod_meta& meta) {
  std::string dir = pod_dir(state_dir_, cookie);
  if (meta.attach_mode == PODSTEER_ATTACH_CLSACT && meta.n_ifaces > 0) {
    auto ns = open_netns(meta.netns_path);
    if (ns && ns->cookie == cookie) {
      (void)in_netns(ns->fd.get(), [&]() -> Status {
        for (size_t i = 0; i < meta.n_ifaces && i < PODSTEER_MAX_IFACES; ++i) {
          bpf_tc_hook hook{};
          hook.sz = sizeof(hook);
          hook.ifindex = meta.ifindex[i];
          hook.attach_point = BPF_TC_INGRESS;
          bpf_tc_opts opts{};
          opts.sz = sizeof(opts);
          opts.handle = meta.tc_handle[i];
          opts.priority = meta.tc_prio[i];
          // only a filter that still runs our program is ours to remove
          if (bpf_tc_query(&hook, &opts) != 0 || opts.prog_id != tc_prog_id_) continue;
          bpf_tc_opts del{};
          del.sz = sizeof(del);
          del.handle = meta.tc_handle[i];
          del.priority = meta.tc_prio[i];
          if (int err = bpf_tc_detach(&hook, &del); err)
            spdlog::warn("detach cls_bpf from ifindex {}: {}", meta.ifindex[i], std::strerror(-err));
        }
        return {};
      });
    }
    // a netns that is gone took its filters with it
  }
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(dir, ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec)) {
    Fd link(bpf_obj_get(it->path().c_str()));
    if (link.valid()) bpf_link_detach(link.get());
  }
  (void)remove_tree(dir);
}

Status Datapath::write_exclusions(uint64_t cookie, const PodOptions& opts) {
  __u8 one = 1;
  for (auto p : opts.exclude_inbound_ports)
    PODSTEER_TRY(ports_->update(podsteer_port_key{cookie, p, PODSTEER_DIR_INBOUND, {}}, one));
  for (auto p : opts.exclude_outbound_ports)
    PODSTEER_TRY(ports_->update(podsteer_port_key{cookie, p, PODSTEER_DIR_OUTBOUND, {}}, one));
  for (const auto& c : opts.exclude_outbound_cidrs) PODSTEER_TRY(cidrs_->update(cidr_key(cookie, c), one));
  return {};
}

// Removes the pod's exclusions, except those in keep (used when settings change).
void Datapath::erase_exclusions(uint64_t cookie, const PodOptions* keep) {
  std::set<std::pair<uint16_t, uint8_t>> keep_ports;
  std::set<std::vector<uint8_t>> keep_cidrs;
  if (keep) {
    for (auto p : keep->exclude_inbound_ports) keep_ports.insert({p, PODSTEER_DIR_INBOUND});
    for (auto p : keep->exclude_outbound_ports) keep_ports.insert({p, PODSTEER_DIR_OUTBOUND});
    for (const auto& c : keep->exclude_outbound_cidrs) {
      auto k = cidr_key(cookie, c);
      keep_cidrs.insert(std::vector<uint8_t>((uint8_t*)&k, (uint8_t*)&k + sizeof(k)));
    }
  }
  if (auto keys = ports_->keys(); keys) {
    for (const auto& k : *keys)
      if (k.netns_cookie == cookie && !keep_ports.count({k.port, k.direction})) (void)ports_->erase(k);
  }
  if (auto keys = cidrs_->keys(); keys) {
    uint32_t hi = htonl(uint32_t(cookie >> 32)), lo = htonl(uint32_t(cookie));
    for (const auto& k : *keys) {
      std::vector<uint8_t> bytes((uint8_t*)&k, (uint8_t*)&k + sizeof(k));
      if (k.netns_cookie_hi == hi && k.netns_cookie_lo == lo && !keep_cidrs.count(bytes)) (void)cidrs_->erase(k);
    }
  }
}

Result<std::vector<Interface>> choose_interfaces(const Netns& ns, const PodOptions& opts) {
  auto ifaces = list_interfaces(ns.fd.get());
  if (!ifaces) return Error{ifaces.error().op, ifaces.error().err, ns.path};
  std::vector<Interface> chosen;
  if (opts.interfaces.empty()) {
    for (const auto& i : *ifaces)
      if (!i.loopback) chosen.push_back(i);
  } else {
    for (const auto& name : opts.interfaces) {
      auto it = std::find_if(ifaces->begin(), ifaces->end(), [&](const Interface& i) { return i.name == name; });
      if (it == ifaces->end()) return invalid(fmt::format("no interface '{}' in the pod's netns", name), ns.path);
      if (it->loopback)
        return invalid(fmt::format("'{}' is a loopback interface: nothing arrives on it from other pods", name), ns.path);
      chosen.push_back(*it);
    }
  }
  if (chosen.empty()) return invalid("the pod's netns has no interface besides loopback", ns.path);
  if (chosen.size() > PODSTEER_MAX_IFACES)
    return invalid(fmt::format("{} interfaces, at most {} are supported", chosen.size(), PODSTEER_MAX_IFACES), ns.path);
  return chosen;
}

void Datapath::erase_pod_ips(uint64_t cookie) {
  auto keys = pod_ips_->keys();
  if (!keys) return;
  for (const auto& k : *keys) {
    auto v = pod_ips_->lookup(k);
    if (v && v->has_value() && **v == cookie) (void)pod_ips_->erase(k);
  }
}

Result<EnrollOutcome> Datapath::enroll(const Netns& ns, const PodOptions& opts,
                                       const std::vector<Interface>* given) {
  auto lock = StateLock::take(state_dir_);
  if (!lock) return lock.error();
  if (opts.pod.size() >= PODSTEER_NAME_LEN) return invalid("pod name too long", opts.pod);
  if (opts.uid.size() >= sizeof(podsteer_pod_meta::uid) ||
      opts.service_account.size() >= sizeof(podsteer_pod_meta::service_account) ||
      opts.container_id.size() >= sizeof(podsteer_pod_meta::container_id))
    return invalid("pod uid, service account or container id too long", opts.pod);
  if (ns.path.size() >= PODSTEER_PATH_LEN) return invalid("netns path too long", ns.path);

  Result<std::vector<Interface>> found = given ? Result<std::vector<Interface>>(*given) : choose_interfaces(ns, opts);
  if (!found) return found.error();
  const std::vector<Interface>& chosen = *found;

  podsteer_pod entry{};
  entry.flags = (opts.dns ? PODSTEER_POD_DNS : 0) | (opts.fail_open ? PODSTEER_POD_FAIL_OPEN : 0);
  for (const auto& i : chosen) {
    if (!(entry.flags & PODSTEER_POD_HAS_IP4) && !i.ip4.empty()) {
      entry.flags |= PODSTEER_POD_HAS_IP4;
      entry.ip4 = i.ip4.front().s_addr;
    }
    if (!(entry.flags & PODSTEER_POD_HAS_IP6) && !i.ip6.empty()) {
      entry.flags |= PODSTEER_POD_HAS_IP6;
      std::memcpy(entry.ip6, &i.ip6.front(), 16);
    }
  }
  entry.enrolled_ns = now_ns();

  auto existing = pods_->lookup(ns.cookie);
  if (!existing) return existing.error();
  if (existing->has_value()) {
    // Re-enroll: settings may change; attachments stay, connections are untouched.
    auto meta = meta_->lookup(ns.cookie);
    if (!meta) return meta.error();
    std::set<unsigned> had, want;
    if (meta->has_value())
      for (size_t i = 0; i < (*meta)->n_ifaces && i < PODSTEER_MAX_IFACES; ++i) had.insert((*meta)->ifindex[i]);
    for (const auto& i : chosen) want.insert(i.ifindex);
    if (had != want)
      return invalid("already enrolled on other interfaces: unenroll it first to change interfaces", ns.path);
    const podsteer_pod& old = **existing;
    entry.enrolled_ns = old.enrolled_ns;
    PODSTEER_TRY(write_exclusions(ns.cookie, opts));
    erase_exclusions(ns.cookie, &opts);
    bool same = old.flags == entry.flags && old.ip4 == entry.ip4 && !std::memcmp(old.ip6, entry.ip6, 16);
    if (meta->has_value()) {
      podsteer_pod_meta m = **meta;
      if (!opts.pod.empty()) copy_str(m.pod, sizeof(m.pod), opts.pod);
      m.n_excluded_cidrs = opts.exclude_outbound_cidrs.size();
      PODSTEER_TRY(meta_->update(ns.cookie, m));
    }
    if (!same) PODSTEER_TRY(pods_->update(ns.cookie, entry));
    return same ? EnrollOutcome::Unchanged : EnrollOutcome::Updated;
  }

  podsteer_pod_meta meta{};  // before undo: the undo steps read it
  Rollback undo;
  uint64_t cookie = ns.cookie;
  undo.add([this, cookie] { erase_exclusions(cookie, nullptr); });
  PODSTEER_TRY(write_exclusions(cookie, opts));
  undo.add([this, cookie] { (void)stats_->erase(cookie); });
  PODSTEER_TRY(stats_->reset(cookie));

  copy_str(meta.pod, sizeof(meta.pod), opts.pod);
  copy_str(meta.uid, sizeof(meta.uid), opts.uid);
  copy_str(meta.service_account, sizeof(meta.service_account), opts.service_account);
  copy_str(meta.container_id, sizeof(meta.container_id), opts.container_id);
  copy_str(meta.netns_path, sizeof(meta.netns_path), ns.path);
  meta.n_excluded_cidrs = opts.exclude_outbound_cidrs.size();
  std::vector<unsigned> ifindexes;
  for (const auto& i : chosen) ifindexes.push_back(i.ifindex);
  undo.add([this, cookie] { erase_pod_ips(cookie); });
  for (const auto& i : chosen) {
    for (const auto& a : i.ip4) {
      podsteer_ip_key k{};
      k.addr[10] = k.addr[11] = 0xff;
      std::memcpy(k.addr + 12, &a, 4);
      PODSTEER_TRY(pod_ips_->update(k, cookie));
    }
    for (const auto& a : i.ip6) {
      podsteer_ip_key k{};
      std::memcpy(k.addr, &a, 16);
      PODSTEER_TRY(pod_ips_->update(k, cookie));
    }
  }
  undo.add([this, cookie, &meta] { detach_tc(cookie, meta); });
  PODSTEER_TRY(attach_tc(ns, ifindexes, opts.tc_mode, meta));
  undo.add([this, cookie] { (void)meta_->erase(cookie); });
  PODSTEER_TRY(meta_->update(cookie, meta));
  PODSTEER_TRY(pods_->update(cookie, entry, BPF_NOEXIST));
  undo.commit();
  return EnrollOutcome::Enrolled;
}

Status Datapath::unenroll(uint64_t cookie) {
  auto meta = meta_->lookup(cookie);
  if (!meta) return meta.error();
  auto entry = pods_->lookup(cookie);
  if (!entry) return entry.error();
  if (!meta->has_value() && !entry->has_value()) return invalid(fmt::format("no pod with netns cookie {} is enrolled", cookie));
  // The pod entry goes first: from then on the socket hooks leave new connections alone.
  PODSTEER_TRY(pods_->erase(cookie));
  if (meta->has_value()) detach_tc(cookie, **meta);
  erase_pod_ips(cookie);
  erase_exclusions(cookie, nullptr);
  PODSTEER_TRY(stats_->erase(cookie));
  PODSTEER_TRY(meta_->erase(cookie));
  return {};
}

Result<uint64_t> Datapath::find_pod(const std::string& netns_path) {
  auto keys = meta_->keys();
  if (!keys) return keys.error();
  for (auto cookie : *keys) {
    auto m = meta_->lookup(cookie);
    if (m && m->has_value() && netns_path == (*m)->netns_path) return cookie;
  }
  // Enrolled under another path to the same namespace (e.g. /proc/PID/ns/net)?
  auto ns = open_netns(netns_path);
  if (ns) {
    auto e = pods_->lookup(ns->cookie);
    if (e && e->has_value()) return ns->cookie;
    auto m = meta_->lookup(ns->cookie);
    if (m && m->has_value()) return ns->cookie;
    return invalid("no pod is enrolled with this network namespace", netns_path);
  }
  return Error{fmt::format("no pod is enrolled with this path, and it does not open as a network namespace ({})",
                           ns.error().message()),
               0, netns_path};
}

Result<std::vector<PodStatus>> Datapath::pods(Detail detail) {
  std::set<uint64_t> cookies;
  auto a = meta_->keys();
  if (!a) return a.error();
  auto b = pods_->keys();
  if (!b) return b.error();
  cookies.insert(a->begin(), a->end());
  cookies.insert(b->begin(), b->end());
  std::vector<podsteer_port_key> ports;
  std::vector<podsteer_cidr_key> cidrs;
  std::map<uint64_t, std::vector<std::string>> addresses;  // one lookup per address, not per pod
  if (detail == Detail::Full) {
    auto p = ports_->keys();
    if (!p) return p.error();
    ports = std::move(*p);
    auto c = cidrs_->keys();
    if (!c) return c.error();
    cidrs = std::move(*c);
    auto ips = pod_ips_->keys();
    if (!ips) return ips.error();
    for (const auto& k : *ips) {
      auto v = pod_ips_->lookup(k);
      if (v && v->has_value()) addresses[**v].push_back(format_ip16(k.addr));
    }
  }
  std::vector<PodStatus> out;
  for (auto cookie : cookies) {
    PodStatus s;
    s.cookie = cookie;
    if (auto e = pods_->lookup(cookie); e && e->has_value()) {
      s.has_entry = true;
      s.entry = **e;
    }
    if (auto m = meta_->lookup(cookie); m && m->has_value()) s.meta = **m;
    if (auto c = stats_->lookup(cookie); c && c->has_value()) {
      for (const auto& cpu : **c) {
        s.counters.redirected_out += cpu.redirected_out;
        s.counters.redirected_in += cpu.redirected_in;
        s.counters.dns_redirected += cpu.dns_redirected;
        s.counters.bypassed += cpu.bypassed;
        s.counters.proxy_missing += cpu.proxy_missing;
      }
    }
    if (s.meta.netns_path[0]) {
      auto ns = open_netns(s.meta.netns_path);
      s.netns_alive = ns.ok() && ns->cookie == cookie;
    }
    for (const auto& k : ports) {
      if (k.netns_cookie != cookie) continue;
      (k.direction == PODSTEER_DIR_INBOUND ? s.excluded_inbound_ports : s.excluded_outbound_ports).push_back(k.port);
    }
    std::sort(s.excluded_inbound_ports.begin(), s.excluded_inbound_ports.end());
    std::sort(s.excluded_outbound_ports.begin(), s.excluded_outbound_ports.end());
    uint32_t hi = htonl(uint32_t(cookie >> 32)), lo = htonl(uint32_t(cookie));
    for (const auto& k : cidrs) {
      if (k.netns_cookie_hi != hi || k.netns_cookie_lo != lo) continue;
      unsigned plen = k.prefixlen - PODSTEER_CIDR_COOKIE_BITS;
      in6_addr a6;
      std::memcpy(&a6, k.addr, 16);
      bool v4 = IN6_IS_ADDR_V4MAPPED(&a6) && plen >= 96;
      s.excluded_cidrs.push_back(fmt::format("{}/{}", format_ip16(k.addr), v4 ? plen - 96 : plen));
    }
    std::sort(s.excluded_cidrs.begin(), s.excluded_cidrs.end());
    s.addresses = addresses[cookie];
    out.push_back(std::move(s));
  }
  return out;
}

Result<std::vector<CgroupLink>> Datapath::cgroup_links() {
  std::vector<CgroupLink> out;
  std::error_code ec;
  for (auto it = std::filesystem::directory_iterator(join(state_dir_, "links"), ec);
       !ec && it != std::filesystem::directory_iterator(); it.increment(ec)) {
    CgroupLink l;
    l.program = it->path().filename().string();
    Fd fd(bpf_obj_get(it->path().c_str()));
    if (fd.valid()) {
      bpf_link_info info{};
      __u32 len = sizeof(info);
      if (bpf_obj_get_info_by_fd(fd.get(), &info, &len) == 0) {
        l.link_id = info.id;
        l.prog_id = info.prog_id;
        l.cgroup_id = info.cgroup.cgroup_id;
      }
    }
    out.push_back(l);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.program < b.program; });
  return out;
}

}  // namespace podsteer
