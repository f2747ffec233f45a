// The socket hooks' steering decision (bpf/steer.bpf.h: what connect4/6 and sendmsg4/6 do
// with a call) under BPF_PROG_TEST_RUN, one case per branch DESIGN.md's outbound table
// describes, in IPv4, IPv6 and v4-mapped form: the object is the same code clang compiles
// into the hooks, run by the kernel against maps the test fills. The integration suite sees
// the same decisions only through real connections.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "addr16.h"
#include "datapath.h"
#include "podsteer_abi.h"
#include "steer_test.h"
#include "steer_test.skel.h"

namespace {

using namespace podsteer;
using test::addr16;
using test::text16;

enum Verdict { LEAVE = 0, TO_OUTBOUND = 1, TO_DNS = 2 };
constexpr uint64_t kPod = 7, kOtherPod = 8, kStranger = 9;
constexpr int kTcp = SOCK_STREAM, kUdp = SOCK_DGRAM;

struct Outcome {
  int verdict = -1;
  std::string target;
  uint16_t port = 0;
  bool enrolled = false;
};

class SteerDecide : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "SKIPPED LOUDLY: BPF_PROG_TEST_RUN needs root";
    load({});
  }
  void TearDown() override {
    if (skel_) steer_test__destroy(skel_);
  }
  struct Settings {
    uint16_t outbound = PODSTEER_DEFAULT_OUTBOUND_PORT, dns = PODSTEER_DEFAULT_DNS_PORT;
    uint32_t mark = PODSTEER_DEFAULT_PROXY_MARK, mask = PODSTEER_DEFAULT_PROXY_MARK_MASK;
  };
  void load(Settings s) {
    if (skel_) steer_test__destroy(skel_);
    skel_ = steer_test__open();
    ASSERT_NE(skel_, nullptr);
    skel_->rodata->cfg_outbound_port = s.outbound;
    skel_->rodata->cfg_dns_port = s.dns;
    skel_->rodata->cfg_proxy_mark = s.mark;
    skel_->rodata->cfg_proxy_mark_mask = s.mask;
    ASSERT_EQ(steer_test__load(skel_), 0) << "the decision does not load";
    // a dual-stack pod with DNS capture, an IPv4-only one without, and no entry for kStranger
    pod(kPod, PODSTEER_POD_DNS | PODSTEER_POD_HAS_IP4 | PODSTEER_POD_HAS_IP6, "10.1.0.2", "fd00::2");
    pod(kOtherPod, PODSTEER_POD_HAS_IP4 | PODSTEER_POD_NO_OUT_PORTS | PODSTEER_POD_NO_OUT_CIDRS, "10.1.0.3", "");
    exclude_port(kPod, 8081);
    exclude_cidr(kPod, "10.9.0.0/16");
    exclude_cidr(kPod, "fd00:9::/32");
    // in the maps, but the pod's flags say it has none: never looked up
    exclude_port(kOtherPod, 8081);
  }
  void pod(uint64_t cookie, uint32_t flags, const std::string& ip4, const std::string& ip6) {
    podsteer_pod p{};
    p.flags = flags;
    if (!ip4.empty()) inet_pton(AF_INET, ip4.c_str(), &p.ip4);
    if (!ip6.empty()) inet_pton(AF_INET6, ip6.c_str(), p.ip6);
    ASSERT_EQ(bpf_map__update_elem(skel_->maps.podsteer_pods, &cookie, sizeof(cookie), &p, sizeof(p), BPF_ANY), 0);
    // enroll makes the pod's counters with its entry
    std::vector<podsteer_counters> zero(libbpf_num_possible_cpus());
    ASSERT_EQ(bpf_map__update_elem(skel_->maps.podsteer_stats, &cookie, sizeof(cookie), zero.data(),
                                   zero.size() * sizeof(podsteer_counters), BPF_ANY),
              0);
  }
  void exclude_port(uint64_t cookie, uint16_t port) {
    podsteer_port_key k{};
    k.netns_cookie = cookie;
    k.port = port;
    k.direction = PODSTEER_DIR_OUTBOUND;
    uint8_t one = 1;
    ASSERT_EQ(bpf_map__update_elem(skel_->maps.podsteer_ports, &k, sizeof(k), &one, 1, BPF_ANY), 0);
  }
  void exclude_cidr(uint64_t cookie, const std::string& text) {
    auto c = parse_cidr(text);
    ASSERT_TRUE(c) << c.error().message();
    auto k = cidr_key(cookie, *c);
    uint8_t one = 1;
    ASSERT_EQ(bpf_map__update_elem(skel_->maps.podsteer_cidrs, &k, sizeof(k), &one, 1, BPF_ANY), 0);
  }
  uint64_t bypassed(uint64_t cookie) {
    int cpus = libbpf_num_possible_cpus();
    std::vector<podsteer_counters> per(cpus);
    if (bpf_map__lookup_elem(skel_->maps.podsteer_stats, &cookie, sizeof(cookie), per.data(),
                             per.size() * sizeof(podsteer_counters), 0) != 0)
      return 0;
    uint64_t n = 0;
    for (const auto& c : per) n += c.bypassed;
    return n;
  }
  Outcome run(int type, const std::string& dst, uint16_t port, uint64_t cookie = kPod,
              uint32_t mark = 0, int protocol = -1) {
    auto* in = &skel_->bss->test_in;
    std::memset(in, 0, sizeof(*in));
    in->mark = mark;
    in->type = type;
    in->protocol = protocol >= 0 ? protocol : (type == kTcp ? IPPROTO_TCP : IPPROTO_UDP);
    in->port = port;
    in->cookie = cookie;
    auto a = addr16(dst);
    std::memcpy(in->addr, a.data(), 16);
    uint8_t pkt[64] = {};
    LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = pkt, .data_size_in = sizeof(pkt), .repeat = 1);
    EXPECT_EQ(bpf_prog_test_run_opts(bpf_program__fd(skel_->progs.steer_test), &opts), 0) << std::strerror(errno);
    const auto& out = skel_->bss->test_out;
    Outcome o;
    o.verdict = out.verdict;
    o.port = out.port;
    o.enrolled = out.enrolled;
    if (out.verdict != LEAVE) o.target = text16(out.target);
    return o;
  }
  steer_test* skel_ = nullptr;
};

#define EXPECT_STEERED(o, verdict_, target_, port_)          \
  do {                                                       \
    auto o_ = (o);                                           \
    EXPECT_EQ(o_.verdict, verdict_);                         \
    EXPECT_EQ(o_.target, target_);                           \
    EXPECT_EQ(o_.port, port_);                               \
  } while (0)

TEST_F(SteerDecide, TcpGoesToTheOutboundListenerAtThePodsOwnAddress) {
  EXPECT_STEERED(run(kTcp, "10.2.0.1", 80), TO_OUTBOUND, "10.1.0.2", 15001);
  EXPECT_STEERED(run(kTcp, "fd00:2::1", 443), TO_OUTBOUND, "fd00::2", 15001);
  // an AF_INET6 socket to ::ffff:10.2.0.1 is IPv4 traffic: the pod's IPv4 address
  EXPECT_STEERED(run(kTcp, "::ffff:10.2.0.1", 80), TO_OUTBOUND, "10.1.0.2", 15001);
  // a family the pod has no address of: its loopback
  EXPECT_STEERED(run(kTcp, "fd00:2::1", 443, kOtherPod), TO_OUTBOUND, "::1", 15001);
  pod(kOtherPod, PODSTEER_POD_HAS_IP6, "", "fd00::3");
  EXPECT_STEERED(run(kTcp, "10.2.0.1", 80, kOtherPod), TO_OUTBOUND, "127.0.0.1", 15001);
}

TEST_F(SteerDecide, TheProxysMarkUnderItsMaskIsLeftAloneAndNeverLooksUpThePod) {
  auto o = run(kTcp, "10.2.0.1", 80, kPod, PODSTEER_DEFAULT_PROXY_MARK);
  EXPECT_EQ(o.verdict, LEAVE);
  EXPECT_FALSE(o.enrolled) << "the mark is checked before the pod lookup";
  // bits outside the mask do not matter; inside, any difference does
  EXPECT_EQ(run(kTcp, "10.2.0.1", 80, kPod, 0x7000 | PODSTEER_DEFAULT_PROXY_MARK).verdict, LEAVE);
  EXPECT_EQ(run(kTcp, "10.2.0.1", 80, kPod, PODSTEER_DEFAULT_PROXY_MARK + 1).verdict, TO_OUTBOUND);
  EXPECT_EQ(run(kTcp, "10.2.0.1", 80, kPod, PODSTEER_DEFAULT_APP_MARK).verdict, TO_OUTBOUND)
      << "the app mark is not the proxy's";
}

TEST_F(SteerDecide, ANetnsWithoutAPodEntryIsLeftAlone) {
  auto o = run(kTcp, "10.2.0.1", 80, kStranger);
  EXPECT_EQ(o.verdict, LEAVE);
  EXPECT_FALSE(o.enrolled);
}

TEST_F(SteerDecide, LoopbackAndThePodsOwnAddressesStayInThePod) {
  for (const char* dst : {"127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.5", "10.1.0.2", "fd00::2", "::ffff:10.1.0.2"}) {
    auto o = run(kTcp, dst, 80);
    EXPECT_EQ(o.verdict, LEAVE) << dst;
    EXPECT_TRUE(o.enrolled) << dst;
  }
}

TEST_F(SteerDecide, DnsGoesToTheDnsListenerOnTheResolversFamily) {
  // UDP and TCP 53 to a resolver elsewhere: 127.0.0.1 or [::1], the DNS port
  EXPECT_STEERED(run(kUdp, "10.96.0.10", 53), TO_DNS, "127.0.0.1", 15053);
  EXPECT_STEERED(run(kTcp, "10.96.0.10", 53), TO_DNS, "127.0.0.1", 15053);
  EXPECT_STEERED(run(kUdp, "fd00:96::a", 53), TO_DNS, "::1", 15053);
  EXPECT_STEERED(run(kUdp, "::ffff:10.96.0.10", 53), TO_DNS, "127.0.0.1", 15053);
  // TCP 53 to the pod's own address is DNS too (Istio: only "! -d 127.0.0.1" for TCP)...
  EXPECT_STEERED(run(kTcp, "10.1.0.2", 53), TO_DNS, "127.0.0.1", 15053);
  // ...to loopback it stays; UDP 53 stays for loopback and the pod's own address ("! -o lo")
  EXPECT_EQ(run(kTcp, "127.0.0.1", 53).verdict, LEAVE);
  EXPECT_EQ(run(kUdp, "127.0.0.53", 53).verdict, LEAVE);
  EXPECT_EQ(run(kUdp, "10.1.0.2", 53).verdict, LEAVE);
  EXPECT_EQ(run(kUdp, "fd00::2", 53).verdict, LEAVE);
  // other UDP is never touched
  EXPECT_EQ(run(kUdp, "10.96.0.10", 5353).verdict, LEAVE);
  EXPECT_EQ(run(kUdp, "10.2.0.1", 443).verdict, LEAVE);
}

TEST_F(SteerDecide, WithoutDnsCapturePort53IsPlainTraffic) {
  EXPECT_EQ(run(kUdp, "10.96.0.10", 53, kOtherPod).verdict, LEAVE);
  EXPECT_STEERED(run(kTcp, "10.96.0.10", 53, kOtherPod), TO_OUTBOUND, "10.1.0.3", 15001);
}

TEST_F(SteerDecide, ExcludedPortsAndCidrsGoDirectAndAreCounted) {
  uint64_t before = bypassed(kPod);
  EXPECT_EQ(run(kTcp, "10.2.0.1", 8081).verdict, LEAVE);
  EXPECT_EQ(run(kTcp, "fd00:2::1", 8081).verdict, LEAVE);
  EXPECT_EQ(run(kTcp, "10.9.200.1", 80).verdict, LEAVE);
  EXPECT_EQ(run(kTcp, "::ffff:10.9.0.1", 80).verdict, LEAVE) << "a v4-mapped destination meets the IPv4 CIDR";
  EXPECT_EQ(run(kTcp, "fd00:9:1::1", 80).verdict, LEAVE);
  EXPECT_EQ(bypassed(kPod), before + 5);
  // next to them, captured
  EXPECT_EQ(run(kTcp, "10.10.0.1", 80).verdict, TO_OUTBOUND);
  EXPECT_EQ(run(kTcp, "fd00:a::1", 80).verdict, TO_OUTBOUND);
  EXPECT_EQ(run(kTcp, "10.2.0.1", 8082).verdict, TO_OUTBOUND);
  // an excluded destination goes direct for DNS too
  exclude_port(kPod, 53);
  EXPECT_EQ(run(kUdp, "10.96.0.10", 53).verdict, LEAVE);
  EXPECT_EQ(run(kUdp, "10.9.0.10", 5353).verdict, LEAVE);
  // a pod whose flags say it has no exclusions is not looked up (its stray map entry ignored)
  EXPECT_EQ(run(kTcp, "10.2.0.1", 8081, kOtherPod).verdict, TO_OUTBOUND);
  EXPECT_EQ(bypassed(kOtherPod), 0u);
}

TEST_F(SteerDecide, OnlyTcpAndDnsOverUdpAreSteered) {
  EXPECT_EQ(run(kTcp, "10.2.0.1", 80, kPod, 0, 262 /* IPPROTO_MPTCP */).verdict, LEAVE);
  EXPECT_EQ(run(kTcp, "10.2.0.1", 80, kPod, 0, 132 /* IPPROTO_SCTP */).verdict, LEAVE);
  EXPECT_EQ(run(SOCK_SEQPACKET, "10.2.0.1", 80, kPod, 0, 132).verdict, LEAVE);
  EXPECT_EQ(run(SOCK_RAW, "10.96.0.10", 53, kPod, 0, IPPROTO_UDP).verdict, LEAVE);
}

TEST_F(SteerDecide, TheNodesPortsAndMarkComeFromItsSettings) {
  load({16001, 16053, 0x2a0, 0xff0});
  EXPECT_STEERED(run(kTcp, "10.2.0.1", 80), TO_OUTBOUND, "10.1.0.2", 16001);
  EXPECT_STEERED(run(kUdp, "10.96.0.10", 53), TO_DNS, "127.0.0.1", 16053);
  EXPECT_EQ(run(kTcp, "10.2.0.1", 80, kPod, 0x2a5).verdict, LEAVE) << "0x2a5 & 0xff0 is the proxy's 0x2a0";
  EXPECT_EQ(run(kTcp, "10.2.0.1", 80, kPod, PODSTEER_DEFAULT_PROXY_MARK).verdict, TO_OUTBOUND)
      << "the default mark is nobody's here";
}

}  // namespace
