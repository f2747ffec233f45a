// What the programs cost (bench.h).
#include "bench.h"

namespace bench {


// bpf_stats' totals for one program; false if the kernel would not say
bool read_prog_stat(int prog_fd, ProgStat& st) {
  bpf_prog_info info{};
  __u32 len = sizeof(info);
  if (bpf_obj_get_info_by_fd(prog_fd, &info, &len) != 0) return false;
  st = {info.run_time_ns, info.run_cnt};
  return true;
}

std::map<std::string, ProgStat> prog_stats(const Setup& s) {
  std::map<std::string, ProgStat> out;
  // the program behind a pinned link, under name
  auto read_link = [&](const fs::path& pin, const std::string& name) {
    int fd = bpf_obj_get(pin.c_str());
    bpf_link_info li{};
    __u32 len = sizeof(li);
    if (fd >= 0 && bpf_obj_get_info_by_fd(fd, &li, &len) == 0) {
      int pfd = bpf_prog_get_fd_by_id(li.prog_id);
      ProgStat st;
      if (pfd >= 0 && read_prog_stat(pfd, st)) out[name] = st;
      if (pfd >= 0) close(pfd);
    }
    if (fd >= 0) close(fd);
  };
  for (const auto& e : fs::directory_iterator(s.state_dir + "/links"))
    read_link(e.path(), e.path().filename().string().substr(9));  // strip "podsteer_"
  // the pod's sk_lookup instance, and its TC egress check (the hole check: every packet the
  // pod sends out of its interface), a cls_bpf program's pin or a tcx link's
  for (const auto& e : fs::recursive_directory_iterator(s.state_dir + "/pods")) {
    std::string name = e.path().filename();
    if (name == "inbound") {
      read_link(e.path(), "lookup");
    } else if (name.rfind("pod_out_tcx_", 0) == 0) {
      read_link(e.path(), "tc_egress");
    } else if (name.rfind("pod_out_clsact_", 0) == 0) {
      int fd = bpf_obj_get(e.path().c_str());
      ProgStat st;
      if (fd >= 0 && read_prog_stat(fd, st)) out["tc_egress"] = st;
      if (fd >= 0) close(fd);
    }
  }
  return out;
}

// The sk_lookup program alone under BPF_PROG_TEST_RUN, in a netns of its own: a SYN from
// a remote client handed to a real listener (the selected socket is checked), and a
// connection the pod makes to itself, which is let through.
json lookup_test_run(bool smoke) {
  json out;
  std::thread t([&] {
    if (unshare(CLONE_NEWNET) != 0) {
      out["error"] = "unshare";
      return;
    }
    auto* skel = podsteer_lookup__open();
    if (!skel) {
      out["error"] = "open";
      return;
    }
    const uint64_t cookie = 7;
    if (podsteer::set_lookup_cookie(skel->progs.podsteer_lookup, cookie) != 0 || podsteer_lookup__load(skel) != 0) {
      out["error"] = "load";
      podsteer_lookup__destroy(skel);
      return;
    }
    podsteer_config cfg{};
    cfg.outbound_port = PODSTEER_DEFAULT_OUTBOUND_PORT;
    cfg.inbound_port = PODSTEER_DEFAULT_INBOUND_PORT;
    cfg.hbone_port = PODSTEER_DEFAULT_HBONE_PORT;
    uint32_t zero_key = 0;
    bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_config), &zero_key, &cfg, BPF_ANY);
    podsteer_pod pod{};  // as enroll writes it for a pod without exclusions
    pod.flags = PODSTEER_POD_NO_OUT_PORTS | PODSTEER_POD_NO_OUT_CIDRS | PODSTEER_POD_NO_IN_PORTS;
    bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_pods), &cookie, &pod, BPF_ANY);
    std::vector<podsteer_counters> zero(libbpf_num_possible_cpus());
    bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_stats), &cookie, zero.data(), BPF_ANY);
    int l = socket(AF_INET6, SOCK_STREAM, 0), off = 0;
    setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof(off));
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(15006);
    bind(l, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    listen(l, 16);
    uint64_t listener_cookie = 0;
    socklen_t cl = sizeof(listener_cookie);
    getsockopt(l, SOL_SOCKET, SO_COOKIE, &listener_cookie, &cl);
    podsteer_listener_key k{cookie, 15006, AF_INET6, 0};
    uint64_t fd64 = l;
    bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_listen), &k, &fd64, BPF_ANY);
    auto run = [&](const char* src, const char* dst) {
      bpf_sk_lookup ctx{};
      ctx.family = AF_INET;
      ctx.protocol = IPPROTO_TCP;
      inet_pton(AF_INET, src, &ctx.remote_ip4);
      inet_pton(AF_INET, dst, &ctx.local_ip4);
      ctx.remote_port = htons(40000);
      ctx.local_port = 9090;
      LIBBPF_OPTS(bpf_test_run_opts, o, .ctx_in = &ctx, .ctx_out = &ctx, .ctx_size_in = sizeof(ctx),
                  .ctx_size_out = sizeof(ctx), .repeat = static_cast<int>(smoke ? 1000 : 1000000));
      bpf_prog_test_run_opts(bpf_program__fd(skel->progs.podsteer_lookup), &o);
      return std::pair<uint32_t, uint64_t>{o.duration, ctx.cookie};
    };
    // five runs of each, alternated: one run's figure moves with this machine's noise
    std::vector<double> syn, self;
    bool selected = true;
    for (int i = 0; i < (smoke ? 1 : 5); ++i) {
      auto [ns, sel] = run("10.1.0.1", "10.1.0.2");
      syn.push_back(ns);
      selected = selected && sel == listener_cookie;
      self.push_back(run("10.1.0.2", "10.1.0.2").first);
    }
    out["syn_from_client_ns_runs"] = syn;
    out["connection_to_itself_ns_runs"] = self;
    out["syn_from_client_ns"] = median(syn);
    out["syn_selected_the_listener"] = selected;
    out["connection_to_itself_ns"] = median(self);
    close(l);
    podsteer_lookup__destroy(skel);
  });
  t.join();
  return out;
}

// The pod's TC ingress program alone under BPF_PROG_TEST_RUN, in a pod netns of its own
// with a "node" netns beside it (a veth pair, a connection stuck in SYN_SENT as a
// kubelet probe is for a moment): a SYN from an address the node has no socket for (a
// client's, or NodePort traffic: the lookup misses), a SYN of the node's own connection
// (found, and recorded in podsteer_node), and an ordinary packet of an existing
// connection (an ACK: nothing to do). Five runs of each, alternated.
json tc_test_run(bool smoke) {
  json out;
  std::mutex mu;
  std::condition_variable cv;
  bool node_ready = false, done = false;
  int node_ns = -1;
  uint16_t node_port = 0;
  std::thread node([&] {
    if (unshare(CLONE_NEWNET) != 0) return;
    // the child of system() is in this thread's netns
    int rc = system("ip link set lo up && ip link add d0 type veth peer name d1 && ip addr add 10.1.0.1/24 dev d0 && "
                    "ip link set d0 up && ip link set d1 up");
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    sockaddr_in to{};
    to.sin_family = AF_INET;
    to.sin_port = htons(9090);
    inet_pton(AF_INET, "10.1.0.2", &to.sin_addr);
    connect(s, reinterpret_cast<sockaddr*>(&to), sizeof(to));  // EINPROGRESS: the SYN goes nowhere
    sockaddr_in local{};
    socklen_t len = sizeof(local);
    getsockname(s, reinterpret_cast<sockaddr*>(&local), &len);
    {
      std::lock_guard<std::mutex> g(mu);
      node_ns = rc == 0 ? open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC) : -1;
      node_port = ntohs(local.sin_port);
      node_ready = true;
    }
    cv.notify_all();
    std::unique_lock<std::mutex> g(mu);
    cv.wait(g, [&] { return done; });
    close(s);
  });
  {
    std::unique_lock<std::mutex> g(mu);
    cv.wait(g, [&] { return node_ready; });
  }
  std::thread pod([&] {
    if (node_ns < 0 || unshare(CLONE_NEWNET) != 0) {
      out["error"] = "netns";
      return;
    }
    int self = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
    auto links = podsteer::node_links(self, node_ns, true);
    auto nsid = links ? podsteer::Result<int32_t>(links->node_nsid) : podsteer::Result<int32_t>(links.error());
    close(self);
    auto* skel = podsteer_lookup__open();
    const uint64_t cookie = 7;
    if (!nsid || !skel || podsteer::set_imm64(skel->progs.podsteer_node_in, PODSTEER_LOOKUP_COOKIE_MAGIC, cookie) != 0 ||
        podsteer::set_imm64(skel->progs.podsteer_node_in, PODSTEER_NODE_NSID_MAGIC, uint64_t(*nsid)) != 0 ||
        podsteer::set_imm64(skel->progs.podsteer_pod_out, PODSTEER_LOOKUP_COOKIE_MAGIC, cookie) != 0 ||
        podsteer::set_lookup_cookie(skel->progs.podsteer_lookup, cookie) != 0 || podsteer_lookup__load(skel) != 0) {
      out["error"] = "load";
      if (skel) podsteer_lookup__destroy(skel);
      return;
    }
    // a 20-byte TCP header to port 9090
    auto fill_tcp = [](uint8_t* at, uint16_t sport, uint8_t flags) {
      auto* tcp = reinterpret_cast<tcphdr*>(at);
      tcp->source = htons(sport);
      tcp->dest = htons(9090);
      tcp->doff = 5;
      at[13] = flags;
    };
    // Ethernet + IPv4 + TCP, from 10.1.0.1:sport to the pod's 10.1.0.2:9090
    auto packet = [&](uint16_t sport, uint8_t flags) {
      std::vector<uint8_t> p(14 + 20 + 20, 0);
      p[12] = 0x08;  // ETH_P_IP
      auto* ip = reinterpret_cast<iphdr*>(p.data() + 14);
      ip->version = 4;
      ip->ihl = 5;
      ip->ttl = 64;
      ip->protocol = IPPROTO_TCP;
      ip->tot_len = htons(40);
      inet_pton(AF_INET, "10.1.0.1", &ip->saddr);
      inet_pton(AF_INET, "10.1.0.2", &ip->daddr);
      fill_tcp(p.data() + 34, sport, flags);
      return p;
    };
    // Ethernet + IPv6 (+ an 8-byte destination-options header) + TCP: the IPv6 fast path, and
    // the walk past an extension header the egress check makes
    auto packet6 = [&](uint8_t flags, bool dstopts) {
      size_t ext = dstopts ? 8 : 0;
      std::vector<uint8_t> p(14 + 40 + ext + 20, 0);
      p[12] = 0x86;  // ETH_P_IPV6
      p[13] = 0xdd;
      uint8_t* ip6 = p.data() + 14;
      ip6[0] = 0x60;
      ip6[5] = uint8_t(ext + 20);  // payload length
      ip6[6] = dstopts ? 60 : IPPROTO_TCP;
      ip6[7] = 64;
      inet_pton(AF_INET6, "fd00::1", ip6 + 8);
      inet_pton(AF_INET6, "fd00::2", ip6 + 24);
      if (dstopts) {
        ip6[40] = IPPROTO_TCP;
        ip6[42] = 1;  // PadN, 4 bytes
        ip6[43] = 4;
      }
      fill_tcp(ip6 + 40 + ext, 40000, flags);
      return p;
    };
    auto run_prog = [&](bpf_program* prog, const std::vector<uint8_t>& p) {
      LIBBPF_OPTS(bpf_test_run_opts, o, .data_in = p.data(), .data_size_in = static_cast<uint32_t>(p.size()),
                  .repeat = static_cast<int>(smoke ? 1000 : 1000000));
      int err = bpf_prog_test_run_opts(bpf_program__fd(prog), &o);
      return err == 0 ? double(o.duration) : -1.0;
    };
    auto run = [&](const std::vector<uint8_t>& p) { return run_prog(skel->progs.podsteer_node_in, p); };
    auto client_syn = packet(40000, 0x02), node_syn = packet(node_port, 0x02), ack = packet(node_port, 0x10);
    auto ack6 = packet6(0x10, false), ack6_ext = packet6(0x10, true);
    std::vector<double> miss, hit, ordinary, out_ordinary, out_syn, out_ordinary6, out_ordinary6_ext;
    for (int i = 0; i < (smoke ? 1 : 5); ++i) {
      miss.push_back(run(client_syn));
      hit.push_back(run(node_syn));
      ordinary.push_back(run(ack));
      // the egress check on the same packets: its fast path (parse, not a SYN), and a SYN
      // without a socket (test_run's skb has none: it stops there, as for a forwarded one)
      out_ordinary.push_back(run_prog(skel->progs.podsteer_pod_out, ack));
      out_syn.push_back(run_prog(skel->progs.podsteer_pod_out, client_syn));
      out_ordinary6.push_back(run_prog(skel->progs.podsteer_pod_out, ack6));
      out_ordinary6_ext.push_back(run_prog(skel->progs.podsteer_pod_out, ack6_ext));
    }
    // the node's SYN was recorded for sk_lookup; the client's was not
    podsteer_tuple_key k{};
    k.netns_cookie = cookie;
    uint8_t pod4[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 0, 2};
    uint8_t node4[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 0, 1};
    std::memcpy(k.dst_addr, pod4, 16);
    std::memcpy(k.src_addr, node4, 16);
    k.dst_port = 9090;
    k.src_port = node_port;
    uint64_t seen = 0;
    out["node_syn_recorded"] = bpf_map_lookup_elem(bpf_map__fd(skel->maps.podsteer_node), &k, &seen) == 0;
    k.src_port = 40000;
    out["client_syn_recorded"] = bpf_map_lookup_elem(bpf_map__fd(skel->maps.podsteer_node), &k, &seen) == 0;
    out["syn_no_node_socket_ns_runs"] = miss;
    out["syn_node_socket_ns_runs"] = hit;
    out["ordinary_packet_ns_runs"] = ordinary;
    out["syn_no_node_socket_ns"] = median(miss);
    out["syn_node_socket_ns"] = median(hit);
    out["ordinary_packet_ns"] = median(ordinary);
    out["egress_ordinary_packet_ns_runs"] = out_ordinary;
    out["egress_syn_no_socket_ns_runs"] = out_syn;
    out["egress_ordinary_packet_ns"] = median(out_ordinary);
    out["egress_ordinary_packet6_ns_runs"] = out_ordinary6;
    out["egress_ordinary_packet6_dstopts_ns_runs"] = out_ordinary6_ext;
    podsteer_lookup__destroy(skel);
  });
  pod.join();
  {
    std::lock_guard<std::mutex> g(mu);
    done = true;
  }
  cv.notify_all();
  node.join();
  if (node_ns >= 0) close(node_ns);
  return out;
}

// What preallocating the tuple map saves: podsteer_orig's insert and delete of one
// connection, preallocated (as podsteer makes it) and not (as earlier builds did), under
// BPF_PROG_TEST_RUN with 64 entries live (this bench's load) and with 50,000 (a busy
// node); in batches of 64 inserts then 64 deletes, on one CPU, and with the deletes on
// a second CPU: a connection's close may be handled on another CPU than its connect(),
// and a map that allocates per entry then refills one CPU's cache while the other's
// overflows. Alternated, five times each; the kernel's memory for each map
// (bytes_memlock, from fdinfo) at that many entries.
uint64_t map_memlock(int fd) {
  std::ifstream in("/proc/self/fdinfo/" + std::to_string(fd));
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("memlock:", 0) == 0) return std::stoull(line.substr(8));
  return 0;
}

json tuple_map_test_run(bool smoke) {
  json out = json::array();
  const int batches = smoke ? 20 : 8000, batch = 64, reps = smoke ? 1 : 5;
  const int ncpu = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  std::thread t([&] {  // a thread of its own: it moves between CPUs
    auto pin = [](int cpu) {
      cpu_set_t set;
      CPU_ZERO(&set);
      CPU_SET(cpu, &set);
      sched_setaffinity(0, sizeof(set), &set);
    };
    auto run = [](bpf_program* p, int n) {
      char pkt[64] = {};
      LIBBPF_OPTS(bpf_test_run_opts, o, .data_in = pkt, .data_size_in = sizeof(pkt), .repeat = n);
      return bpf_prog_test_run_opts(bpf_program__fd(p), &o) == 0 ? double(o.duration) : -1.0;
    };
    for (uint32_t live : {64u, 50000u})
      for (bool across : {false, true}) {
        if (across && ncpu < 2) continue;
        std::map<std::string, std::vector<double>> ns;
        std::map<std::string, uint64_t> memlock;
        for (int rep = 0; rep < reps; ++rep)
          for (bool prealloc : {rep % 2 == 0, rep % 2 != 0}) {
            auto* skel = podsteer_tuplemap__open_and_load();
            if (!skel) {
              out = json{{"error", "load"}};
              return;
            }
            auto* ins = prealloc ? skel->progs.prealloc_insert : skel->progs.noprealloc_insert;
            auto* del = prealloc ? skel->progs.prealloc_delete : skel->progs.noprealloc_delete;
            std::string name = prealloc ? "preallocated" : "not preallocated";
            pin(0);
            run(ins, static_cast<int>(live));
            double total = 0;
            for (int i = 0; i < batches; ++i) {
              pin(0);
              total += run(ins, batch);
              if (across) pin(1);
              total += run(del, batch);
            }
            ns[name].push_back(total / batches);
            memlock[name] = map_memlock(bpf_map__fd(prealloc ? skel->maps.tuple_prealloc : skel->maps.tuple_noprealloc));
            podsteer_tuplemap__destroy(skel);
          }
        json row = {{"live_entries", live}, {"deletes_on_another_cpu", across}};
        for (const auto& [name, v] : ns) row[name] = {{"ns_per_connection", v}, {"bytes_memlock", memlock[name]}};
        out.push_back(row);
      }
  });
  t.join();
  return out;
}

}  // namespace bench
