// Side-by-side benchmark: the same forwarding proxy (podsteer-proxy) in a pod netns, and
// three ways of getting the pod's connections to it, measured interleaved in one run:
//   direct          the client connects to the proxy's port itself: the floor
//   podsteer        the client connects to the server; our programs steer it
//   istio-iptables  istio-cni's in-pod ambient rules (nat REDIRECT, marks, connmark,
//                   probe accept, fwmark route) with the proxy reading SO_ORIGINAL_DST
// Also: per-program BPF cost under that load (kernel.bpf_stats_enabled), the sk_lookup and
// TC programs alone under BPF_PROG_TEST_RUN, and scaling with 1/100/10,000 outbound CIDR
// exclusions.
// Writes results.json, RESULTS.md and a gnuplot PNG of connection rates.
#include "bench.h"

using namespace bench;

int main(int argc, char** argv) {
  CLI::App app{"podsteer side-by-side benchmark"};
  int rounds = 3, threads = 4;
  double seconds = 2;
  bool smoke = false;
  std::string out_dir = "bench";
  std::vector<int> exclusions = {1, 100, 10000};
  uint64_t bulk_mb = 512;
  Setup s;
  app.add_option("--rounds", rounds);
  app.add_option("--seconds", seconds, "per measurement");
  app.add_option("--threads", threads, "parallel clients");
  app.add_option("--exclusions", exclusions)->delimiter(',');
  app.add_option("--bulk-mb", bulk_mb);
  app.add_option("--settle", s.settle, "seconds every mode waits after its switch, before it is measured")
      ->capture_default_str();
  app.add_option("--out-dir", out_dir);
  app.add_flag("--smoke", smoke, "a few seconds in all, to keep the benchmark from rotting; no thresholds");
  bool programs_only = false;
  app.add_flag("--programs-only", programs_only,
               "only the sk_lookup and TC programs under BPF_PROG_TEST_RUN, printed as JSON (about 10 s)");
  app.add_option("--podsteer", s.podsteer)->required();
  app.add_option("--proxy", s.proxy_bin)->required();
  CLI11_PARSE(app, argc, argv);
  if (programs_only) {
    fmt::print("{}\n", json{{"lookup_prog_test_run", lookup_test_run(smoke)}, {"tc_prog_test_run", tc_test_run(smoke)}}.dump(2));
    return 0;
  }
  if (smoke) {
    rounds = 1;
    seconds = 0.3;
    threads = 2;
    exclusions = {1, 100};
    bulk_mb = 16;
    s.settle = 0.1;
  }
  signal(SIGPIPE, SIG_IGN);

  s.id = fmt::format("{}", getpid());
  std::string pod = "psb-" + s.id + "-pod", srv = "psb-" + s.id + "-srv";
  s.pod_ns = "/var/run/netns/" + pod;
  s.srv_ns = "/var/run/netns/" + srv;
  s.cgroup = cg2_root() + "/podsteer-bench-" + s.id;
  s.proxy_cg = s.cgroup + "/proxy";
  s.app_cg = s.cgroup + "/app";
  s.state_dir = "/sys/fs/bpf/podsteer-bench-" + s.id;
  s.dir = fs::temp_directory_path() / ("podsteer-bench-" + s.id);
  fs::create_directories(s.dir);
  auto cleanup = [&] {
    if (s.proxy_pid > 0) kill(s.proxy_pid, SIGKILL);
    if (s.server_pid > 0) kill(s.server_pid, SIGKILL);
    if (s.app_pid > 0) kill(s.app_pid, SIGKILL);
    while (waitpid(-1, nullptr, 0) > 0) {
    }
    sh(fmt::format("{} --state-dir {} uninstall >/dev/null 2>&1", s.podsteer, s.state_dir));
    sh(fmt::format("ip netns del {} 2>/dev/null; ip netns del {} 2>/dev/null", pod, srv));
    for (const auto& d : {s.proxy_cg, s.app_cg, s.cgroup}) rmdir(d.c_str());
    fs::remove_all(s.dir);
  };
  g_cleanup = cleanup;
  clean_up_on_signals();
  must(sh(fmt::format("ip netns add {P} && ip netns add {S} && ip -n {P} link add eth0 type veth peer name eth0 netns {S} && "
                      "ip -n {P} addr add {pi}/24 dev eth0 && ip -n {S} addr add {si}/24 dev eth0 && "
                      "ip -n {P} link set eth0 up && ip -n {S} link set eth0 up && ip -n {P} link set lo up && ip -n {S} link set lo up",
                      fmt::arg("P", pod), fmt::arg("S", srv), fmt::arg("pi", s.pod_ip), fmt::arg("si", s.srv_ip))) == 0,
       "netns setup");
  for (const auto& d : {s.cgroup, s.proxy_cg, s.app_cg}) fs::create_directories(d);
  // Tens of thousands of short connections a run leave TIME_WAIT sockets behind; with the
  // default port range the pod runs out of ephemeral ports and connect() crawls, which
  // would measure port exhaustion instead of redirection. Both netns get the usual
  // load-testing settings.
  // The ranges do not overlap: inbound, the proxy connects to the app from the client's
  // address with a port of the pod's range; were it one the client also uses, its tuple
  // could meet the client's own connection (or its TIME_WAIT) in the pod and stall for a
  // retransmit - under Istio's rules as under podsteer's, and measuring the port
  // allocator again.
  must(sh("nsenter --net=" + s.pod_ns + " sysctl -qw net.ipv4.ip_local_port_range='33000 65000' net.ipv4.tcp_tw_reuse=1") == 0 &&
           sh("nsenter --net=" + s.srv_ns + " sysctl -qw net.ipv4.ip_local_port_range='1024 32999' net.ipv4.tcp_tw_reuse=1") == 0,
       "sysctl");

  s.server_pid = fork();
  if (s.server_pid == 0) {
    enter(s.srv_ns, "");
    run_server(s.port);
  }
  s.app_pid = fork();  // the pod's own app, under the hook cgroup like the pod's processes
  if (s.app_pid == 0) {
    enter(s.pod_ns, s.app_cg);
    run_server(s.app_port);
  }
  // the proxy, fed the pod over ZDS by a minimal in-process server
  std::string zds_path = s.dir + "/zds.sock";
  podsteer::Fd zl(socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un ua{};
  ua.sun_family = AF_UNIX;
  strncpy(ua.sun_path, zds_path.c_str(), sizeof(ua.sun_path) - 1);
  must(bind(zl.get(), reinterpret_cast<sockaddr*>(&ua), sizeof(ua)) == 0 && listen(zl.get(), 1) == 0, "zds listen");
  s.proxy_pid = fork();
  if (s.proxy_pid == 0) {
    std::ofstream(s.proxy_cg + "/cgroup.procs") << getpid() << std::endl;
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    std::string up = s.srv_ip + ":" + std::to_string(s.port);
    std::string in_up = s.pod_ip + ":" + std::to_string(s.app_port);
    execl(s.proxy_bin.c_str(), s.proxy_bin.c_str(), "--zds-socket", zds_path.c_str(), "--default-upstream", up.c_str(),
          "--default-inbound-upstream", in_up.c_str(), "--quiet", nullptr);
    _exit(127);
  }
  podsteer::Fd zc(accept(zl.get(), nullptr, nullptr));
  must(podsteer::zds::receive(zc.get(), 5000).ok(), "zds hello");
  istio::workload::zds::WorkloadRequest add;
  add.mutable_add()->set_uid("bench-client");
  add.mutable_add()->mutable_workload_info()->set_name("client");
  add.mutable_add()->mutable_workload_info()->set_namespace_("bench");
  podsteer::Fd nsfd(open(s.pod_ns.c_str(), O_RDONLY | O_CLOEXEC));
  must(podsteer::zds::send(zc.get(), add, nsfd.get()).ok() && podsteer::zds::receive(zc.get(), 5000).ok(), "zds add");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));

  const std::vector<std::string> modes = {"direct", "podsteer", "istio-iptables"};
  // The i-th of the modes' six orders. Not a rotation: in one, every mode always follows the
  // same other mode and inherits what that one left (TIME_WAIT sockets holding the ports it
  // will need, conntrack's flush); over all six, each follows each equally often.
  auto order = [&](int i) {
    std::vector<std::string> o = modes;
    for (int n = 0; n < i % 6; ++n) std::next_permutation(o.begin(), o.end());
    return o;
  };
  std::map<std::string, std::map<std::string, std::vector<double>>> m;  // mode -> metric -> rounds
  // direction -> program -> ns_per_run | runs_per_conn | ns_per_conn -> rounds
  std::map<std::string, std::map<std::string, std::map<std::string, std::vector<double>>>> bpf;
  std::map<std::string, std::map<int, std::vector<double>>> scale;       // mode -> exclusions -> conn/s
  // direction -> cpu_ns_per_conn | bpf_share -> rounds
  std::map<std::string, std::map<std::string, std::vector<double>>> cpu_share;
  // direction -> mode -> conn/s, one per slice; slice i of every mode is in the same cycle
  std::map<std::string, std::map<std::string, std::vector<double>>> paired;
  const int cycles = smoke ? 1 : 6;
  uint64_t errors = 0;
  for (int round = 0; round < rounds; ++round) {
    for (size_t k = 0; k < modes.size(); ++k) {
      const std::string mode = order(round)[k];  // a copy: order() returns a new vector
      mode_on(s, mode, 0);  // Istio's default: no exclusions (scaling with them: below)
      auto [ip, port] = target(s, mode);
      auto [in_ip, in_port] = inbound_target(s, mode);
      auto shortr = load_in_pod(s, "short", ip, port, seconds, threads, 0);
      auto inbound = load_in(s.srv_ns, "", "short", in_ip, in_port, seconds, threads, 0);
      auto [flooded, syns] = inbound_under_flood(s, in_ip, in_port, seconds, threads);
      m[mode]["flood_conn_per_sec"].push_back(flooded.conn_per_sec);
      m[mode]["flood_syn_per_sec"].push_back(syns / (seconds + 0.5));
      // the flood's half-open connections are dropped (timeouts) before the next mode runs
      std::this_thread::sleep_for(std::chrono::milliseconds(smoke ? 200 : 2000));
      if (mode == "podsteer") {
        // program costs in runs of their own: bpf_stats timing must not slow the rates above
        sh("sysctl -qw kernel.bpf_stats_enabled=1");
        EmptyProgs empty(s);
        for (bool in : {false, true}) {
          auto before = prog_stats(s);
          auto empty_before = empty.stats();
          double cpu_before = busy_cpu_ns();
          auto r = in ? load_in(s.srv_ns, "", "short", in_ip, in_port, seconds / 2, threads, 0)
                      : load_in_pod(s, "short", ip, port, seconds / 2, threads, 0);
          double cpu_ns = busy_cpu_ns() - cpu_before;
          auto empty_after = empty.stats();
          const char* dir = in ? "inbound" : "outbound";
          double bpf_ns = 0;
          for (const auto& [name, st] : prog_stats(s)) {
            auto b = before[name];
            if (st.cnt <= b.cnt || r.count == 0) continue;
            auto& d = bpf[dir][name];
            d["ns_per_run"].push_back(double(st.ns - b.ns) / double(st.cnt - b.cnt));
            d["runs_per_conn"].push_back(double(st.cnt - b.cnt) / double(r.count));
            d["ns_per_conn"].push_back(double(st.ns - b.ns) / double(r.count));
            bpf_ns += double(st.ns - b.ns);
            auto e = empty_after[name], eb = empty_before[name];
            if (e.cnt > eb.cnt) d["empty_ns_per_run"].push_back(double(e.ns - eb.ns) / double(e.cnt - eb.cnt));
          }
          if (r.count > 0 && cpu_ns > 0) {
            cpu_share[dir]["cpu_ns_per_conn"].push_back(cpu_ns / double(r.count));
            cpu_share[dir]["bpf_share"].push_back(bpf_ns / cpu_ns);
          }
        }
        sh("sysctl -qw kernel.bpf_stats_enabled=0");
      }
      auto rr = load_in_pod(s, "rr", ip, port, seconds, threads, 0);
      auto bulk = load_in_pod(s, "bulk", ip, port, seconds, 1, bulk_mb << 20);
      mode_off(s, mode);
      errors += shortr.errors + inbound.errors + rr.errors + bulk.errors;
      m[mode]["conn_per_sec"].push_back(shortr.conn_per_sec);
      m[mode]["in_conn_per_sec"].push_back(inbound.conn_per_sec);
      m[mode]["rr_p50_us"].push_back(rr.p50_us);
      m[mode]["rr_p99_us"].push_back(rr.p99_us);
      m[mode]["bulk_gbit"].push_back(bulk.gbit_per_sec);
      fprintf(stderr, "round %d %-15s %8.0f conn/s out %8.0f in  rr p50 %6.1f us p99 %6.1f us  bulk %5.2f Gbit/s  errors %lu\n",
              round + 1, mode.c_str(), shortr.conn_per_sec, inbound.conn_per_sec, rr.p50_us, rr.p99_us, bulk.gbit_per_sec,
              (unsigned long)(shortr.errors + inbound.errors + rr.errors + bulk.errors));
    }
    // Short slices back to back, the three modes in turn (each of their six orders in turn): the
    // rates above are measured up to a minute apart, with floods and bulk transfers between,
    // and the machine's own drift over that time is wider than the differences sought.
    for (int c = 0; c < cycles; ++c)
      for (size_t k = 0; k < modes.size(); ++k) {
        const std::string mode = order(round * cycles + c)[k];
        mode_on(s, mode, 0);
        auto [ip, port] = target(s, mode);
        auto [in_ip, in_port] = inbound_target(s, mode);
        auto out = load_in_pod(s, "short", ip, port, seconds / 2, threads, 0);
        auto in = load_in(s.srv_ns, "", "short", in_ip, in_port, seconds / 2, threads, 0);
        mode_off(s, mode);
        errors += out.errors + in.errors;
        paired["outbound"][mode].push_back(out.conn_per_sec);
        paired["inbound"][mode].push_back(in.conn_per_sec);
      }
    for (int n : exclusions) {
      for (const std::string mode : {"podsteer", "istio-iptables"}) {
        mode_on(s, mode, n);
        auto [ip, port] = target(s, mode);
        auto r = load_in_pod(s, "short", ip, port, seconds, threads, 0);
        mode_off(s, mode);
        errors += r.errors;
        scale[mode][n].push_back(r.conn_per_sec);
        fprintf(stderr, "round %d %-15s %5d exclusions %8.0f conn/s\n", round + 1, mode.c_str(), n, r.conn_per_sec);
      }
    }
  }
  json lookup = lookup_test_run(smoke);
  json tc = tc_test_run(smoke);
  json tuple_map = tuple_map_test_run(smoke);
  clean_up();

  // ---- write results ----
  fs::create_directories(out_dir);
  json j;
  j["machine"] = machine();
  j["rounds"] = rounds;
  j["seconds_per_measurement"] = seconds;
  j["parallel_clients"] = threads;
  j["errors"] = errors;
  j["modes"] = m;
  j["bpf_per_program"] = bpf;
  j["bpf_share_of_cpu"] = cpu_share;
  j["paired_slices_conn_per_sec"] = paired;
  j["lookup_prog_test_run"] = lookup;
  j["tc_prog_test_run"] = tc;
  j["tuple_map_test_run"] = tuple_map;
  json js;
  for (const auto& [mode, byn] : scale)
    for (const auto& [n, v] : byn) js[mode][std::to_string(n)] = v;
  j["exclusion_scaling_conn_per_sec"] = js;
  std::ofstream(out_dir + "/results.json") << j.dump(2) << "\n";

  auto med = [&](const std::string& mode, const std::string& metric) { return median(m[mode][metric]); };
  std::string md;
  md += "# podsteer benchmark results\n\n";
  md += fmt::format("Machine: {}. {} round(s), modes interleaved (a different order of the three each round), {} s per measurement, "
                    "{} parallel clients; the same podsteer-proxy in the pod netns in every mode. Errors: {}.\n"
                    "Generated by `scripts/bench.sh`; values are medians with (min-max) over rounds.\n\n",
                    j["machine"].get<std::string>(), rounds, seconds, threads, errors);
  auto ratio = [&](const std::string& metric, const std::string& mode, const std::string& base) {
    return med(mode, metric) / med(base, metric);
  };
  // (podsteer - istio) / (direct - istio): the share of Istio's overhead podsteer removes
  auto removed = [&](const std::string& metric) {
    double d = med("direct", metric), p = med("podsteer", metric), i = med("istio-iptables", metric);
    return d > i ? (p - i) / (d - i) : 0.0;
  };
  md += "## Short connections through the proxy (connect, 64 B each way, close)\n\n"
        "| mode | outbound conn/s | vs direct | inbound conn/s (client's address kept) | vs direct | rr p50 us | rr p99 us | bulk Gbit/s |\n"
        "|---|---|---|---|---|---|---|---|\n";
  for (const auto& mode : modes)
    md += fmt::format("| {} | {} | {:.3f}x | {} | {:.3f}x | {} | {} | {} |\n", mode, spread(m[mode]["conn_per_sec"]),
                      ratio("conn_per_sec", mode, "direct"), spread(m[mode]["in_conn_per_sec"]),
                      ratio("in_conn_per_sec", mode, "direct"), spread(m[mode]["rr_p50_us"], 1),
                      spread(m[mode]["rr_p99_us"], 1), spread(m[mode]["bulk_gbit"], 2));
  md += fmt::format("\nShare of Istio's overhead that podsteer removes, (podsteer - istio) / (direct - istio): "
                    "outbound {:.2f}, inbound {:.2f}.\n",
                    removed("conn_per_sec"), removed("in_conn_per_sec"));
  md += "\n## Inbound short connections during a SYN flood\n\nA second process floods the same port with SYNs from spoofed "
        "addresses (198.18.0.0/15, as fast as one core sends them) while the real client keeps connecting. The listener's "
        "queue overflows and SYN cookies take over; under Istio's rules every SYN also makes a conntrack entry.\n\n"
        "| mode | SYNs/s sent | completed conn/s during the flood | vs without the flood |\n|---|---|---|---|\n";
  for (const auto& mode : modes)
    md += fmt::format("| {} | {} | {} | {:.2f}x |\n", mode, spread(m[mode]["flood_syn_per_sec"]),
                      spread(m[mode]["flood_conn_per_sec"]), med(mode, "flood_conn_per_sec") / med(mode, "in_conn_per_sec"));
  md += "\n## Outbound exclusion CIDRs (short connections/s)\n\n| exclusions | podsteer | istio-iptables | podsteer / istio |\n|---|---|---|---|\n";
  for (int n : exclusions)
    md += fmt::format("| {} | {} | {} | {:.2f}x |\n", n, spread(scale["podsteer"][n]), spread(scale["istio-iptables"][n]),
                      median(scale["podsteer"][n]) / median(scale["istio-iptables"][n]));
  // Paired slices: per cycle, podsteer / direct and the share of Istio's overhead removed
  struct Paired {
    std::vector<double> ratio, share;  // podsteer / direct and the share removed, one per cycle
    double sum_ratio = 0, istio_ratio = 0, removed = 0;
  };
  std::map<std::string, Paired> pr;
  for (const char* dir : {"outbound", "inbound"}) {
    auto& d = paired[dir]["direct"];
    auto& p = paired[dir]["podsteer"];
    auto& i = paired[dir]["istio-iptables"];
    double sd = 0, sp = 0, si = 0;
    for (size_t c = 0; c < d.size() && c < p.size() && c < i.size(); ++c) {
      if (d[c] > 0) pr[dir].ratio.push_back(p[c] / d[c]);
      if (d[c] > i[c]) pr[dir].share.push_back((p[c] - i[c]) / (d[c] - i[c]));
      sd += d[c], sp += p[c], si += i[c];
    }
    pr[dir].sum_ratio = sd > 0 ? sp / sd : 0;
    pr[dir].istio_ratio = sd > 0 ? si / sd : 0;
    pr[dir].removed = sd > si ? (sp - si) / (sd - si) : 0;
  }
  // The 95 % confidence interval of the median of v, from order statistics (the binomial
  // distribution, normal approximation): needs no assumption about the noise's shape.
  auto median_ci = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    double n = double(v.size()), h = 0.98 * std::sqrt(n);
    size_t lo = size_t(std::max(0.0, std::floor(n / 2 - h))), hi = size_t(std::min(n - 1, std::ceil(n / 2 + h)));
    return std::pair<double, double>{v[lo], v[hi]};
  };
  // met when the whole interval clears the goal, not met when none of it does; else the
  // machine's noise is wider than the margin and the run shows neither
  auto judged = [&](const std::vector<double>& v, double goal) {
    if (v.size() < 6) return fmt::format("not shown: {} cycle(s) are too few for an interval", v.size());
    auto [lo, hi] = median_ci(v);
    if (lo >= goal) return std::string("met");
    if (hi < goal) return std::string("**not met**");
    return fmt::format("not shown: the median's 95 % interval, {:.3f}-{:.3f}, holds the goal", lo, hi);
  };
  auto quartiles = [](std::vector<double> v) {
    if (v.empty()) return std::string("-");
    std::sort(v.begin(), v.end());
    return fmt::format("{:.3f} ({:.3f}-{:.3f})", v[v.size() / 2], v[v.size() / 4], v[(v.size() * 3) / 4]);
  };
  md += fmt::format("\n## Short connections in paired slices\n\n{} cycles of {} s slices, the three modes back to back in each "
                    "(each of the six orders equally often), outbound then inbound in each slice. Drift of the machine over a cycle is small; over "
                    "a round, with floods and bulk transfers between the modes, it is not.\n\n"
                    "| direction | podsteer / direct per cycle, median (quartiles) | podsteer / direct, all cycles | "
                    "istio / direct, all cycles | share of Istio's overhead removed, all cycles |\n|---|---|---|---|---|\n",
                    pr["outbound"].ratio.size(), seconds / 2);
  for (const char* dir : {"outbound", "inbound"})
    md += fmt::format("| {} | {} | {:.3f} | {:.3f} | {:.2f} |\n", dir, quartiles(pr[dir].ratio), pr[dir].sum_ratio,
                      pr[dir].istio_ratio, pr[dir].removed);

  std::map<std::string, double> total_ns, empty_ns;
  for (const char* dir : {"outbound", "inbound"}) {
    md += fmt::format("\n## BPF work per {} short connection (kernel.bpf_stats_enabled, in runs of their own; every "
                      "program that runs for it, both ends)\n\nNext to each program, for the same runs, one of its type "
                      "that does nothing: what bpf_stats reports for it is the cost of a run itself, which no change to "
                      "podsteer's code removes.\n\n"
                      "| program | ns per run | empty program, ns per run | runs per connection | ns per connection | "
                      "above an empty program, ns per connection |\n|---|---|---|---|---|---|\n",
                      dir);
    for (auto& [name, d] : bpf[dir]) {
      double runs = median(d["runs_per_conn"]), e = median(d["empty_ns_per_run"]);
      md += fmt::format("| {} | {} | {} | {} | {} | {:.0f} |\n", name, spread(d["ns_per_run"]), spread(d["empty_ns_per_run"]),
                        spread(d["runs_per_conn"], 1), spread(d["ns_per_conn"]), median(d["ns_per_conn"]) - e * runs);
      total_ns[dir] += median(d["ns_per_conn"]);
      empty_ns[dir] += e * runs;
    }
    md += fmt::format("| **all** | | | | **{:.0f}** | **{:.0f}** |\n", total_ns[dir], total_ns[dir] - empty_ns[dir]);
    auto& c = cpu_share[dir];
    md += fmt::format("\nThe machine's busy CPU time per connection in the same runs: {:.0f} us; podsteer's programs took "
                      "{:.1f} % of it ({}).\n",
                      median(c["cpu_ns_per_conn"]) / 1000, median(c["bpf_share"]) * 100,
                      [&] {
                        std::vector<double> pct;
                        for (double x : c["bpf_share"]) pct.push_back(x * 100);
                        return spread(pct, 1) + " % over rounds";
                      }());
  }
  auto runs_in = [](const json& from, const char* k) {
    std::vector<double> v;
    for (const auto& x : from.value(k, json::array())) v.push_back(x.get<double>());
    return v;
  };
  auto runs_of = [&](const char* k) { return runs_in(lookup, k); };
  auto tc_runs = [&](const char* k) { return runs_in(tc, k); };
  md += fmt::format("\nThe sk_lookup program alone under BPF_PROG_TEST_RUN, median of {} runs (min-max): {} ns for a "
                    "client's SYN handed to the proxy's listener (selected it: {}), {} ns for a connection the pod "
                    "makes to itself. It runs only when a packet matches no connection: packets of existing connections "
                    "cost it nothing.\n",
                    runs_of("syn_from_client_ns_runs").size(), spread(runs_of("syn_from_client_ns_runs")),
                    lookup.value("syn_selected_the_listener", false), spread(runs_of("connection_to_itself_ns_runs")));
  md += fmt::format("\nThe TC ingress program alone under BPF_PROG_TEST_RUN, median of {} runs (min-max): {} ns for a "
                    "SYN the node has no socket for (a client's, or NodePort traffic), {} ns for a SYN of the node's own "
                    "connection (recorded for sk_lookup: {}; the client's: {}), {} ns for an ordinary packet.\n",
                    tc_runs("syn_no_node_socket_ns_runs").size(), spread(tc_runs("syn_no_node_socket_ns_runs")),
                    spread(tc_runs("syn_node_socket_ns_runs")), tc.value("node_syn_recorded", false),
                    tc.value("client_syn_recorded", false), spread(tc_runs("ordinary_packet_ns_runs")));
  md += fmt::format("\nThe TC egress program (the hole check) alone under BPF_PROG_TEST_RUN on the same packets, "
                    "median of {} runs (min-max): {} ns for an ordinary packet (its fast path: every packet the pod "
                    "sends out of its interface), {} ns for a SYN without a socket; the same runs' TC ingress program "
                    "on the ordinary packet: {} ns (ratio egress/ingress {:.2f}).\n",
                    tc_runs("egress_ordinary_packet_ns_runs").size(), spread(tc_runs("egress_ordinary_packet_ns_runs")),
                    spread(tc_runs("egress_syn_no_socket_ns_runs")), spread(tc_runs("ordinary_packet_ns_runs")),
                    tc.value("ordinary_packet_ns", 0.0) > 0
                        ? tc.value("egress_ordinary_packet_ns", 0.0) / tc.value("ordinary_packet_ns", 0.0)
                        : 0.0);
  md += fmt::format("\nThe same egress program on an ordinary IPv6 packet: {} ns; behind an 8-byte "
                    "destination-options header (walked past, so no extension header hides a SYN): {} ns.\n",
                    spread(tc_runs("egress_ordinary_packet6_ns_runs")),
                    spread(tc_runs("egress_ordinary_packet6_dstopts_ns_runs")));
  md += "\nThe tuple map's insert and delete for one connection (podsteer_orig's types and size) under "
        "BPF_PROG_TEST_RUN, median of the runs: preallocated as podsteer makes it, and not, as earlier builds did; "
        "with the deletes on the inserts' CPU and on another (a connection's close may be handled on another CPU "
        "than its connect()). Memory: the kernel's for the map (bytes_memlock) at that many entries.\n\n"
        "| entries live | deletes | preallocated | not | not / preallocated | memory, preallocated | memory, not |\n"
        "|---|---|---|---|---|---|---|\n";
  for (const auto& row : tuple_map) {
    if (!row.contains("live_entries")) continue;
    auto ns_of = [&](const char* k) {
      std::vector<double> v;
      for (const auto& x : row[k]["ns_per_connection"]) v.push_back(x.get<double>());
      return median(v);
    };
    double pre = ns_of("preallocated"), not_pre = ns_of("not preallocated");
    md += fmt::format("| {} | {} | {:.0f} ns | {:.0f} ns | {:.2f} | {:.1f} MiB | {:.1f} MiB |\n",
                      row["live_entries"].get<uint32_t>(),
                      row["deletes_on_another_cpu"].get<bool>() ? "another CPU" : "same CPU", pre, not_pre,
                      pre > 0 ? not_pre / pre : 0, row["preallocated"]["bytes_memlock"].get<double>() / 1048576,
                      row["not preallocated"]["bytes_memlock"].get<double>() / 1048576);
  }
  auto per_run = [&](const std::string& name) {
    if (name == "getpeername")  // the app's socket may be IPv4 or dual stack: whichever ran
      return std::max(median(bpf["outbound"]["getpeername4"]["ns_per_run"]), median(bpf["outbound"]["getpeername6"]["ns_per_run"]));
    return median(bpf["outbound"][name]["ns_per_run"]);
  };
  auto met = [](bool ok) { return ok ? "met" : "**not met**"; };
  md += "\n## Goals (issue 13)\n\nThe rates are judged on the paired slices, cycle by cycle: met when the 95 % confidence "
        "interval of the median over cycles clears the goal, not met when it lies wholly below it, and otherwise not "
        "shown either way. On this 2-CPU machine the client, the proxy and the server share two cores, and the "
        "machine's own noise can be wider than a goal's margin; a ratio above 1.0 can only be noise (podsteer cannot "
        "beat no redirection).\n\n| measure | goal | measured | |\n|---|---|---|---|\n";
  // judged on the paired slices, per cycle; the medians of the rounds are shown beside them
  for (const char* dir : {"outbound", "inbound"}) {
    bool in = std::string(dir) == "inbound";
    const char* metric = in ? "in_conn_per_sec" : "conn_per_sec";
    md += fmt::format("| {}, podsteer / direct | >= 0.97 | paired: median {:.3f}, all cycles {:.3f}; rounds {:.3f} | {} |\n",
                      in ? "inbound short connections, client's address kept" : "outbound short connections",
                      median(pr[dir].ratio), pr[dir].sum_ratio, ratio(metric, "podsteer", "direct"),
                      judged(pr[dir].ratio, 0.97));
    md += fmt::format("| {}: share of Istio's overhead removed | >= 0.9 | paired: median {:.2f}, all cycles {:.2f}; rounds {:.2f} | {} |\n",
                      dir, median(pr[dir].share), pr[dir].removed, removed(metric), judged(pr[dir].share, 0.9));
  }
  md += fmt::format("| connect4 / sockops / getsockopt / getpeername per run | <= 200 / 100 / 100 / 100 ns | {:.0f} / {:.0f} / {:.0f} / {:.0f} | {} |\n",
                    per_run("connect4"), per_run("sockops"), per_run("getsockopt"), per_run("getpeername"),
                    met(per_run("connect4") <= 200 && per_run("sockops") <= 100 && per_run("getsockopt") <= 100 &&
                        per_run("getpeername") <= 100));
  md += fmt::format("| all BPF work of one short connection, both ends | <= 2000 ns | outbound {:.0f}, inbound {:.0f} (an empty "
                    "program in each of the same runs: {:.0f}, {:.0f}) | {} |\n",
                    total_ns["outbound"], total_ns["inbound"], empty_ns["outbound"], empty_ns["inbound"],
                    met(total_ns["outbound"] <= 2000 && total_ns["inbound"] <= 2000));
  md += fmt::format("| sk_lookup per SYN | <= 150 ns | {:.0f} ns (test_run, median of runs) | {} |\n",
                    lookup.value("syn_from_client_ns", 0.0), met(lookup.value("syn_from_client_ns", 0.0) <= 150));
  double tc_syn = std::max(tc.value("syn_no_node_socket_ns", 0.0), tc.value("syn_node_socket_ns", 0.0));
  md += fmt::format("| TC ingress (node-opened connections) per SYN | <= 150 ns | {:.0f} ns with no socket on the node, "
                    "{:.0f} ns for the node's own (test_run, median of runs) | {} |\n",
                    tc.value("syn_no_node_socket_ns", 0.0), tc.value("syn_node_socket_ns", 0.0), met(tc_syn <= 150));
  md += fmt::format("| TC ingress per ordinary packet | <= 60 ns | {:.0f} ns (an ACK of an open connection; test_run) | {} |\n",
                    tc.value("ordinary_packet_ns", 0.0), met(tc.value("ordinary_packet_ns", 0.0) <= 60));
  md += fmt::format("| TC egress (the hole check) per ordinary packet | <= 60 ns | {:.0f} ns (test_run) | {} |\n",
                    tc.value("egress_ordinary_packet_ns", 0.0), met(tc.value("egress_ordinary_packet_ns", 0.0) <= 60));
  md += "\n![connection rate](connection_rate.png)\n";
  std::ofstream(out_dir + "/RESULTS.md") << md;

  // plot: connection rate per mode and exclusion count
  std::ofstream dat(s.dir.empty() ? "/tmp/podsteer-bench.dat" : out_dir + "/connection_rate.dat");
  // each mode's median with its spread over rounds (min, max): a difference within the spread
  // is not one
  auto with_spread = [](const std::vector<double>& v) {
    if (v.empty()) return std::string("0 0 0");
    auto [lo, hi] = std::minmax_element(v.begin(), v.end());
    return fmt::format("{} {} {}", median(v), *lo, *hi);
  };
  dat << "# exclusions podsteer(median min max) istio-iptables(median min max) direct(median min max)\n";
  for (int n : exclusions)
    dat << n << " " << with_spread(scale["podsteer"][n]) << " " << with_spread(scale["istio-iptables"][n]) << " "
        << with_spread(m["direct"]["conn_per_sec"]) << "\n";
  dat.close();
  std::ofstream gp(out_dir + "/connection_rate.gp");
  gp << "set terminal pngcairo size 800,450\nset output '" << out_dir << "/connection_rate.png'\n"
     << "set title \"short connections per second through the same proxy\\n(median; bars and band: min-max over "
     << "rounds)\"\nset logscale x\n"
     << "set xlabel 'outbound exclusion CIDRs'\nset ylabel 'connections/s'\nset yrange [0:*]\nset key bottom left\n"
     << "set xtics (" << [&] {
          std::string t;
          for (size_t i = 0; i < exclusions.size(); ++i) t += fmt::format("{}'{}' {}", i ? ", " : "", exclusions[i], exclusions[i]);
          return t;
        }() << ")\n"
     << "set style fill transparent solid 0.3 noborder\n"
     << "plot '" << out_dir << "/connection_rate.dat' using 1:9:10 with filledcurves lc rgb 'gray' title 'direct: min-max', "
     << "'' using 1:8 with lines dt 2 lc rgb 'gray40' title 'direct (no redirect)', "
     << "'' using 1:2:3:4 with yerrorlines lw 2 title 'podsteer', "
     << "'' using 1:5:6:7 with yerrorlines lw 2 title 'istio-iptables'\n";
  gp.close();
  if (sh("command -v gnuplot >/dev/null") == 0) sh("gnuplot " + out_dir + "/connection_rate.gp");
  fs::remove(out_dir + "/connection_rate.gp");
  fs::remove(out_dir + "/connection_rate.dat");
  printf("%s", md.c_str());
  return 0;
}
