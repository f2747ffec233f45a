// The sk_lookup program under BPF_PROG_TEST_RUN: build a lookup context, set up maps and
// a real listening socket, run the program, check the verdict, the socket it selected and
// the per-pod counters. Each case runs on a thread in a private network namespace, where
// the test's own listeners are the only sockets (sk_lookup may only select sockets of the
// netns it runs in).
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <gtest/gtest.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "podsteer_abi.h"
#include "lookup_cookie.h"
#include "podsteer_lookup.skel.h"

#ifndef SO_COOKIE
#define SO_COOKIE 57
#endif

namespace {

constexpr uint64_t kCookie = 4242;

struct Lookup {
  int family = AF_INET;
  int protocol = IPPROTO_TCP;
  const char* src = "10.1.0.1";
  uint16_t sport = 40000;
  const char* dst = "10.1.0.2";
  uint16_t dport = 9090;
};

struct Outcome {
  int verdict = -1;         // SK_PASS (1) or SK_DROP (0)
  uint64_t selected = 0;    // cookie of the socket the program handed the connection to
};

class LookupProgTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) {
      fprintf(stderr, "\n*** SKIPPING PRIVILEGED BPF TEST: not root ***\n\n");
      GTEST_SKIP() << "needs root";
    }
  }
  void TearDown() override {
    for (int fd : sockets) close(fd);
    if (skel) podsteer_lookup__destroy(skel);
  }

  // Loads the pod's instance: the program is per pod, its cookie written into its code;
  // the ports come from podsteer_config, as the install writes it.
  void load() {
    skel = podsteer_lookup__open();
    ASSERT_NE(skel, nullptr);
    ASSERT_EQ(podsteer::set_lookup_cookie(skel->progs.podsteer_lookup, kCookie), 0);
    ASSERT_EQ(podsteer_lookup__load(skel), 0) << "load podsteer_lookup: " << strerror(errno);
    podsteer_config cfg{};
    cfg.outbound_port = PODSTEER_DEFAULT_OUTBOUND_PORT;
    cfg.inbound_port = PODSTEER_DEFAULT_INBOUND_PORT;
    cfg.hbone_port = PODSTEER_DEFAULT_HBONE_PORT;
    cfg.dns_port = PODSTEER_DEFAULT_DNS_PORT;
    uint32_t zero = 0;
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_config), &zero, &cfg, BPF_ANY), 0);
  }

  void enroll(uint32_t flags = 0) {
    podsteer_pod pod{};
    pod.flags = flags;
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_pods), &kCookie, &pod, BPF_ANY), 0);
    std::vector<podsteer_counters> zero(libbpf_num_possible_cpus());
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_stats), &kCookie, zero.data(), BPF_ANY), 0);
  }

  // A listening socket in this thread's netns, put into podsteer_listen as the proxy's
  // inbound listener; returns its socket cookie.
  uint64_t proxy_listener(int family, bool v6only = false) {
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockets.push_back(fd);
    int v = v6only;
    if (family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, sizeof(v));
    sockaddr_storage ss{};
    if (family == AF_INET6) {
      auto* a = reinterpret_cast<sockaddr_in6*>(&ss);
      a->sin6_family = AF_INET6;
      a->sin6_port = htons(15006);
    } else {
      auto* a = reinterpret_cast<sockaddr_in*>(&ss);
      a->sin_family = AF_INET;
      a->sin_port = htons(15006);
    }
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&ss), sizeof(ss)), 0) << strerror(errno);
    EXPECT_EQ(listen(fd, 8), 0);
    podsteer_listener_key k{kCookie, 15006, uint16_t(family), 0};
    uint64_t value = fd;
    EXPECT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_listen), &k, &value, BPF_ANY), 0)
        << strerror(errno);
    uint64_t cookie = 0;
    socklen_t len = sizeof(cookie);
    getsockopt(fd, SOL_SOCKET, SO_COOKIE, &cookie, &len);
    return cookie;
  }

  Outcome run(const Lookup& l) {
    bpf_sk_lookup ctx{};
    ctx.family = l.family;
    ctx.protocol = l.protocol;
    ctx.remote_port = htons(l.sport);
    ctx.local_port = l.dport;
    if (l.family == AF_INET) {
      inet_pton(AF_INET, l.src, &ctx.remote_ip4);
      inet_pton(AF_INET, l.dst, &ctx.local_ip4);
    } else {
      inet_pton(AF_INET6, l.src, ctx.remote_ip6);
      inet_pton(AF_INET6, l.dst, ctx.local_ip6);
    }
    LIBBPF_OPTS(bpf_test_run_opts, o, .ctx_in = &ctx, .ctx_out = &ctx, .ctx_size_in = sizeof(ctx),
                .ctx_size_out = sizeof(ctx));
    EXPECT_EQ(bpf_prog_test_run_opts(bpf_program__fd(skel->progs.podsteer_lookup), &o), 0) << strerror(errno);
    return Outcome{int(o.retval), ctx.cookie};
  }

  podsteer_counters counters() {
    std::vector<podsteer_counters> rows(libbpf_num_possible_cpus());
    podsteer_counters sum{};
    if (bpf_map_lookup_elem(bpf_map__fd(skel->maps.podsteer_stats), &kCookie, rows.data()) != 0) return sum;
    for (const auto& r : rows) {
      sum.redirected_in += r.redirected_in;
      sum.bypassed += r.bypassed;
      sum.proxy_missing += r.proxy_missing;
    }
    return sum;
  }

  // Runs body on a thread in a private netns.
  void in_private_netns(const std::function<void()>& body) {
    std::thread t([&] {
      ASSERT_EQ(unshare(CLONE_NEWNET), 0) << strerror(errno);
      load();
      body();
    });
    t.join();
  }

  podsteer_lookup* skel = nullptr;
  std::vector<int> sockets;
};

TEST_F(LookupProgTest, ClientSynGoesToTheProxyListenerV4AndV6) {
  in_private_netns([&] {
    enroll();
    uint64_t listener = proxy_listener(AF_INET6);  // dual stack, as ztunnel binds [::]
    auto v4 = run({});
    EXPECT_EQ(v4.verdict, SK_PASS);
    EXPECT_EQ(v4.selected, listener) << "an IPv4 client goes to the dual-stack listener";
    auto v6 = run({AF_INET6, IPPROTO_TCP, "fd00::1", 40000, "fd00::2", 9090});
    EXPECT_EQ(v6.verdict, SK_PASS);
    EXPECT_EQ(v6.selected, listener);
    EXPECT_EQ(counters().redirected_in, 2u);
  });
}

TEST_F(LookupProgTest, AnIPv4OnlyProxyTakesIPv4Clients) {
  in_private_netns([&] {
    enroll();
    uint64_t listener = proxy_listener(AF_INET);  // a proxy that binds 0.0.0.0 only
    auto v4 = run({});
    EXPECT_EQ(v4.verdict, SK_PASS);
    EXPECT_EQ(v4.selected, listener);
    EXPECT_EQ(counters().proxy_missing, 0u);
    EXPECT_EQ(run({AF_INET6, IPPROTO_TCP, "fd00::1", 40000, "fd00::2", 9090}).verdict, SK_DROP)
        << "no listener takes IPv6: fail closed";
    EXPECT_EQ(counters().proxy_missing, 1u);
  });
}

TEST_F(LookupProgTest, PodNotEnrolledIsLeftAlone) {
  in_private_netns([&] {
    proxy_listener(AF_INET6);
    auto o = run({});
    EXPECT_EQ(o.verdict, SK_PASS);
    EXPECT_EQ(o.selected, 0u);
  });
}

TEST_F(LookupProgTest, NoListenerFailsClosedOrOpen) {
  in_private_netns([&] {
    enroll();
    EXPECT_EQ(run({}).verdict, SK_DROP) << "fail closed: refused, never to the app";
    EXPECT_EQ(counters().proxy_missing, 1u);
    enroll(PODSTEER_POD_FAIL_OPEN);
    auto o = run({});
    EXPECT_EQ(o.verdict, SK_PASS);
    EXPECT_EQ(o.selected, 0u) << "fail open: the normal lookup (the app) takes it";
  });
}

TEST_F(LookupProgTest, IPv6OnlyListenerCannotTakeIPv4AndFailsClosed) {
  in_private_netns([&] {
    enroll();
    proxy_listener(AF_INET6, /*v6only=*/true);
    EXPECT_EQ(run({}).verdict, SK_DROP);
    EXPECT_EQ(counters().proxy_missing, 1u);
    uint64_t v4 = proxy_listener(AF_INET);
    EXPECT_EQ(run({}).selected, v4) << "the IPv4 listener takes what the IPv6-only one cannot";
    EXPECT_EQ(counters().proxy_missing, 1u) << "a listener was found: nothing missing the second time";
  });
}

TEST_F(LookupProgTest, ProxyPortsProbeSourcesAndExcludedPortsAreLeftAlone) {
  in_private_netns([&] {
    enroll();
    proxy_listener(AF_INET6);
    podsteer_port_key pk{kCookie, 9091, PODSTEER_DIR_INBOUND, {}};
    __u8 one = 1;
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_ports), &pk, &one, BPF_ANY), 0);
    for (uint16_t port : {15008, 15006, 15001}) {
      Lookup l;
      l.dport = port;
      auto o = run(l);
      EXPECT_EQ(o.verdict, SK_PASS) << port;
      EXPECT_EQ(o.selected, 0u) << port;
    }
    Lookup excluded;
    excluded.dport = 9091;
    EXPECT_EQ(run(excluded).selected, 0u);
    Lookup probe;
    probe.src = "169.254.7.127";
    EXPECT_EQ(run(probe).selected, 0u);
    auto probe6 = run({AF_INET6, IPPROTO_TCP, "fd16:9254:7127:1337:ffff:ffff:ffff:ffff", 40000, "fd00::2", 9090});
    EXPECT_EQ(probe6.selected, 0u);
    EXPECT_EQ(counters().bypassed, 3u);
    EXPECT_EQ(counters().redirected_in, 0u);
    // a pod enrolled without excluded inbound ports says so, and its SYNs skip that lookup
    enroll(PODSTEER_POD_NO_IN_PORTS);
    EXPECT_NE(run(excluded).selected, 0u) << "the flag, not the map, decides: enroll sets it only when there are none";
  });
}

TEST_F(LookupProgTest, ConnectionsThePodMakesToItselfAreLeftAlone) {
  in_private_netns([&] {
    enroll();
    proxy_listener(AF_INET6);
    for (const Lookup& l : {Lookup{AF_INET, IPPROTO_TCP, "127.0.0.1", 40000, "127.0.0.1", 9090},
                            Lookup{AF_INET, IPPROTO_TCP, "10.1.0.2", 40000, "10.1.0.2", 9090},
                            Lookup{AF_INET6, IPPROTO_TCP, "::1", 40000, "::1", 9090},
                            Lookup{AF_INET6, IPPROTO_TCP, "fd00::2", 40000, "fd00::2", 9090},
                            Lookup{AF_INET, IPPROTO_UDP, "10.1.0.1", 40000, "10.1.0.2", 53}}) {
      auto o = run(l);
      EXPECT_EQ(o.verdict, SK_PASS) << l.src;
      EXPECT_EQ(o.selected, 0u) << l.src << " -> " << l.dst;
    }
    EXPECT_EQ(counters().redirected_in, 0u);
  });
}

TEST_F(LookupProgTest, ProxyConnectionFromAClientAddressReachesTheApp) {
  in_private_netns([&] {
    enroll();
    uint64_t listener = proxy_listener(AF_INET6);
    // what sock_ops records while the proxy's transparent SYN is in flight
    podsteer_tuple_key t{};
    t.netns_cookie = kCookie;
    t.dst_addr[10] = t.dst_addr[11] = t.src_addr[10] = t.src_addr[11] = 0xff;
    inet_pton(AF_INET, "10.1.0.2", t.dst_addr + 12);
    inet_pton(AF_INET, "10.1.0.1", t.src_addr + 12);
    t.dst_port = 9090;
    t.src_port = 40000;
    __u8 one = 1;
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_transi), &t, &one, BPF_ANY), 0);
    EXPECT_EQ(run({}).selected, 0u) << "the proxy's own connection must reach the app, not loop back";
    Lookup other_port;
    other_port.sport = 40001;
    EXPECT_EQ(run(other_port).selected, listener) << "the same client from another port is captured";
  });
}

}  // namespace
