// The TC ingress program under BPF_PROG_TEST_RUN: build a packet, set up maps, run the
// program, check the verdict and the per-pod counters. Each case runs on a thread in a
// private network namespace, where the test's own listeners are the only sockets.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <gtest/gtest.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "podsteer_abi.h"
#include "podsteer_tc.skel.h"

namespace {

constexpr uint64_t kCookie = 4242;

struct Pkt4 {
  ethhdr eth;
  iphdr ip;
  tcphdr tcp;
} __attribute__((packed));

struct Pkt6 {
  ethhdr eth;
  ipv6hdr ip;
  tcphdr tcp;
} __attribute__((packed));

std::vector<uint8_t> tcp4(const char* src, const char* dst, uint16_t dport, bool syn, bool ack) {
  Pkt4 p{};
  p.eth.h_proto = htons(ETH_P_IP);
  p.ip.version = 4;
  p.ip.ihl = 5;
  p.ip.ttl = 64;
  p.ip.protocol = IPPROTO_TCP;
  p.ip.tot_len = htons(sizeof(iphdr) + sizeof(tcphdr));
  inet_pton(AF_INET, src, &p.ip.saddr);
  inet_pton(AF_INET, dst, &p.ip.daddr);
  p.tcp.source = htons(40000);
  p.tcp.dest = htons(dport);
  p.tcp.doff = 5;
  p.tcp.syn = syn;
  p.tcp.ack = ack;
  auto* b = reinterpret_cast<uint8_t*>(&p);
  return std::vector<uint8_t>(b, b + sizeof(p));
}

std::vector<uint8_t> tcp6(const char* src, const char* dst, uint16_t dport) {
  Pkt6 p{};
  p.eth.h_proto = htons(ETH_P_IPV6);
  p.ip.version = 6;
  p.ip.nexthdr = IPPROTO_TCP;
  p.ip.hop_limit = 64;
  p.ip.payload_len = htons(sizeof(tcphdr));
  inet_pton(AF_INET6, src, &p.ip.saddr);
  inet_pton(AF_INET6, dst, &p.ip.daddr);
  p.tcp.source = htons(40000);
  p.tcp.dest = htons(dport);
  p.tcp.doff = 5;
  p.tcp.syn = 1;
  auto* b = reinterpret_cast<uint8_t*>(&p);
  return std::vector<uint8_t>(b, b + sizeof(p));
}

class TcProgTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) {
      fprintf(stderr, "\n*** SKIPPING PRIVILEGED BPF TEST: not root ***\n\n");
      GTEST_SKIP() << "needs root";
    }
    skel = podsteer_tc__open_and_load();
    ASSERT_NE(skel, nullptr) << "load podsteer_tc: " << strerror(errno);
  }
  void TearDown() override {
    if (skel) podsteer_tc__destroy(skel);
  }

  void enroll(uint32_t flags, const char* ip4, const char* ip6) {
    podsteer_pod pod{};
    pod.flags = flags;
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_pods), &kCookie, &pod, BPF_ANY), 0);
    podsteer_ip_key k{};
    k.addr[10] = k.addr[11] = 0xff;
    inet_pton(AF_INET, ip4, k.addr + 12);
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_ips), &k, &kCookie, BPF_ANY), 0);
    podsteer_ip_key k6{};
    inet_pton(AF_INET6, ip6, k6.addr);
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_ips), &k6, &kCookie, BPF_ANY), 0);
    int ncpu = libbpf_num_possible_cpus();
    std::vector<podsteer_counters> zero(ncpu);
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_stats), &kCookie, zero.data(), BPF_ANY), 0);
  }
  void exclude_inbound(uint16_t port) {
    podsteer_port_key k{kCookie, port, PODSTEER_DIR_INBOUND, {}};
    uint8_t one = 1;
    ASSERT_EQ(bpf_map_update_elem(bpf_map__fd(skel->maps.podsteer_ports), &k, &one, BPF_ANY), 0);
  }
  podsteer_counters counters() {
    int ncpu = libbpf_num_possible_cpus();
    std::vector<podsteer_counters> row(ncpu);
    podsteer_counters sum{};
    if (bpf_map_lookup_elem(bpf_map__fd(skel->maps.podsteer_stats), &kCookie, row.data()) != 0) return sum;
    for (const auto& c : row) {
      sum.redirected_in += c.redirected_in;
      sum.bypassed += c.bypassed;
      sum.proxy_missing += c.proxy_missing;
    }
    return sum;
  }
  int run(std::vector<uint8_t> pkt) {
    LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = pkt.data(), .data_size_in = (__u32)pkt.size(), .repeat = 1);
    int err = bpf_prog_test_run_opts(bpf_program__fd(skel->progs.podsteer_tc_ingress), &opts);
    EXPECT_EQ(err, 0) << strerror(errno);
    return static_cast<int>(opts.retval);
  }
  // Runs fn on a thread in a fresh netns (unshare affects only that thread).
  void in_private_netns(const std::function<void()>& fn) {
    std::thread t([&] {
      if (unshare(CLONE_NEWNET) != 0) {
        ADD_FAILURE() << "unshare(CLONE_NEWNET): " << strerror(errno);
        return;
      }
      fn();
    });
    t.join();
  }
  static int listen6(uint16_t port) {
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    int zero = 0;
    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_port = htons(port);
    if (bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(fd, 8) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }

  podsteer_tc* skel = nullptr;
};

TEST_F(TcProgTest, PacketsForPodsNotEnrolledPassUntouched) {
  in_private_netns([&] {
    EXPECT_EQ(run(tcp4("10.0.0.1", "10.0.0.2", 9090, true, false)), TC_ACT_OK);
    EXPECT_EQ(run(tcp6("fd00::1", "fd00::2", 9090)), TC_ACT_OK);
  });
}

TEST_F(TcProgTest, SynWithoutListenerIsDroppedWhenFailClosed) {
  in_private_netns([&] {
    enroll(0, "10.0.0.2", "fd00::2");
    EXPECT_EQ(run(tcp4("10.0.0.1", "10.0.0.2", 9090, true, false)), TC_ACT_SHOT);
    EXPECT_EQ(run(tcp6("fd00::1", "fd00::2", 9090)), TC_ACT_SHOT);
    EXPECT_EQ(counters().proxy_missing, 2u);
    EXPECT_EQ(counters().redirected_in, 0u);
  });
}

TEST_F(TcProgTest, SynWithoutListenerPassesWhenFailOpen) {
  in_private_netns([&] {
    enroll(PODSTEER_POD_FAIL_OPEN, "10.0.0.2", "fd00::2");
    EXPECT_EQ(run(tcp4("10.0.0.1", "10.0.0.2", 9090, true, false)), TC_ACT_OK);
    EXPECT_EQ(counters().proxy_missing, 1u);
  });
}

// The handoff itself (bpf_sk_assign) needs a real ingress skb: BPF_PROG_TEST_RUN refuses
// it, so the integration tests check that a SYN reaches the inbound listener.

TEST_F(TcProgTest, NonSynHboneProbeAndExcludedPortsAreLeftAlone) {
  in_private_netns([&] {
    enroll(0, "10.0.0.2", "fd00::2");
    exclude_inbound(9091);
    // with no listener, anything the program tried to steer would be dropped (fail closed)
    EXPECT_EQ(run(tcp4("10.0.0.1", "10.0.0.2", 9090, false, true)), TC_ACT_OK) << "ACK of an existing connection";
    EXPECT_EQ(run(tcp4("10.0.0.1", "10.0.0.2", 9090, true, true)), TC_ACT_OK) << "SYN-ACK";
    EXPECT_EQ(run(tcp4("10.0.0.1", "10.0.0.2", PODSTEER_DEFAULT_HBONE_PORT, true, false)), TC_ACT_OK);
    EXPECT_EQ(run(tcp4("169.254.7.127", "10.0.0.2", 9090, true, false)), TC_ACT_OK) << "kubelet probe";
    EXPECT_EQ(run(tcp6("fd16:9254:7127:1337:ffff:ffff:ffff:ffff", "fd00::2", 9090)), TC_ACT_OK) << "v6 probe";
    EXPECT_EQ(run(tcp4("10.0.0.1", "10.0.0.2", 9091, true, false)), TC_ACT_OK) << "excluded port";
    EXPECT_EQ(counters().bypassed, 3u);
    EXPECT_EQ(counters().proxy_missing, 0u);
  });
}

TEST_F(TcProgTest, MalformedAndNonTcpPacketsPass) {
  in_private_netns([&] {
    enroll(0, "10.0.0.2", "fd00::2");
    auto syn = tcp4("10.0.0.1", "10.0.0.2", 9090, true, false);
    EXPECT_EQ(run(std::vector<uint8_t>(syn.begin(), syn.begin() + sizeof(ethhdr) + sizeof(iphdr) + 10)), TC_ACT_OK)
        << "TCP header cut short";
    auto udp = syn;
    reinterpret_cast<Pkt4*>(udp.data())->ip.protocol = IPPROTO_UDP;
    EXPECT_EQ(run(udp), TC_ACT_OK);
    auto frag = syn;
    reinterpret_cast<Pkt4*>(frag.data())->ip.frag_off = htons(0x2000);
    EXPECT_EQ(run(frag), TC_ACT_OK) << "fragment";
    EXPECT_EQ(counters().proxy_missing, 0u);
  });
}

}  // namespace
