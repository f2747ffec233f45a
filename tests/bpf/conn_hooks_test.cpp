// What the socket hooks other than connect/sendmsg build and decide (bpf/conn.bpf.h) under
// BPF_PROG_TEST_RUN. Each hook sees one connection from its own side and in its own
// context's byte order; the keys they build must be the same bytes, or SO_ORIGINAL_DST,
// getpeername and the transit entries silently find nothing. The test fills the contexts as
// the kernel shows them (include/uapi/linux/bpf.h: bpf_sock_ops' remote_port in network byte
// order in its upper half, local_port in host order; bpf_sock's src_port in host order,
// dst_port in network order; bpf_sock_addr's user_port in network order), runs the very code
// the hooks run, and checks each key field by field and against the others.
#include <arpa/inet.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <gtest/gtest.h>
#include <linux/bpf.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "addr16.h"
#include "conn_test.h"
#include "conn_test.skel.h"

namespace {

using podsteer::test::addr16;
using podsteer::test::text16;

constexpr uint64_t kPod = 7, kStranger = 9;
enum Role { CONN_NONE = 0, CONN_PROXY = 1, CONN_APP = 2 };
enum Plan { CLOSE_TRANSIT = 1, CLOSE_ORIG = 2, CLOSE_MISSING = 4 };
enum Answer { ANSWER_KERNEL = 0, ANSWER_ORIG = 1, ANSWER_LOCAL = 2 };
constexpr uint32_t kEstablished = 1, kSynSent = 2, kFinWait1 = 4, kClose = 7;  // BPF_TCP_*

bool is_v6(const std::string& ip) { return ip.find(':') != std::string::npos; }

// An address into a context's fields: ip4 (network order) or ip6 words
void put_ip(const std::string& ip, uint32_t* ip4, uint32_t* ip6) {
  auto a = addr16(ip);
  if (is_v6(ip)) std::memcpy(ip6, a.data(), 16);
  else std::memcpy(ip4, &a[12], 4);
}

class ConnHooks : public ::testing::Test {
 protected:
  void SetUp() override {
    if (geteuid() != 0) GTEST_SKIP() << "SKIPPED LOUDLY: BPF_PROG_TEST_RUN needs root";
    load(PODSTEER_DEFAULT_PROXY_MARK, PODSTEER_DEFAULT_PROXY_MARK_MASK, PODSTEER_DEFAULT_APP_MARK);
  }
  void TearDown() override {
    if (skel_) conn_test__destroy(skel_);
  }
  void load(uint32_t mark, uint32_t mask, uint32_t app_mark) {
    if (skel_) conn_test__destroy(skel_);
    skel_ = conn_test__open();
    ASSERT_NE(skel_, nullptr);
    skel_->rodata->cfg_proxy_mark = mark;
    skel_->rodata->cfg_proxy_mark_mask = mask;
    skel_->rodata->cfg_app_mark = app_mark;
    ASSERT_EQ(conn_test__load(skel_), 0) << "the hooks' code does not load";
    podsteer_pod p{};
    p.flags = PODSTEER_POD_HAS_IP4;
    ASSERT_EQ(bpf_map__update_elem(skel_->maps.podsteer_pods, &kPod, sizeof(kPod), &p, sizeof(p), BPF_ANY), 0);
  }
  decltype(conn_test::bss) in() { return skel_->bss; }
  const conn_test_out& run() {
    uint8_t pkt[64] = {};
    LIBBPF_OPTS(bpf_test_run_opts, opts, .data_in = pkt, .data_size_in = sizeof(pkt), .repeat = 1);
    EXPECT_EQ(bpf_prog_test_run_opts(bpf_program__fd(skel_->progs.conn_test), &opts), 0) << std::strerror(errno);
    return skel_->bss->t_out;
  }

  // An app at app:app_port connects; connect4/6 sent it to the listener at pod:port. The
  // contexts each hook sees of that connection. family: what the socket is (an AF_INET6
  // socket may carry v4-mapped addresses).
  void outbound(int family, const std::string& app, uint16_t app_port, const std::string& pod, uint16_t port) {
    auto* b = in();
    b->t_cookie = kPod;
    auto& ops = b->t_ops_app;  // sock_ops on the app's socket: local = the app
    std::memset(&ops, 0, sizeof(ops));
    ops.family = family;
    put_ip(app, &ops.local_ip4, ops.local_ip6);
    put_ip(pod, &ops.remote_ip4, ops.remote_ip6);
    ops.local_port = app_port;
    ops.remote_port = htonl(port);
    auto& px = b->t_sk_proxy;  // the proxy's accepted socket: local = the listener
    std::memset(&px, 0, sizeof(px));
    px.family = family;
    px.type = SOCK_STREAM;
    put_ip(pod, &px.src_ip4, px.src_ip6);
    put_ip(app, &px.dst_ip4, px.dst_ip6);
    px.src_port = port;
    px.dst_port = htons(app_port);
    auto& sk = b->t_sk_app;  // the app's socket again, at getpeername
    std::memset(&sk, 0, sizeof(sk));
    sk.family = family;
    sk.type = SOCK_STREAM;
    put_ip(app, &sk.src_ip4, sk.src_ip6);
    put_ip(pod, &sk.dst_ip4, sk.dst_ip6);
    sk.src_port = app_port;
    sk.dst_port = htons(port);
    auto& a = b->t_addr;  // getpeername's answer as the kernel made it: the listener
    std::memset(&a, 0, sizeof(a));
    a.family = family;
    put_ip(pod, &a.user_ip4, a.user_ip6);
    a.user_port = htons(port);
  }

  // The proxy at client:client_port (IP_TRANSPARENT) connects to the app at app:app_port
  void transit(int family, const std::string& client, uint16_t client_port, const std::string& app, uint16_t app_port) {
    auto* b = in();
    b->t_cookie = kPod;
    auto& px = b->t_ops_proxy;
    std::memset(&px, 0, sizeof(px));
    px.family = family;
    put_ip(client, &px.local_ip4, px.local_ip6);
    put_ip(app, &px.remote_ip4, px.remote_ip6);
    px.local_port = client_port;
    px.remote_port = htonl(app_port);
    auto& ac = b->t_ops_accepted;
    std::memset(&ac, 0, sizeof(ac));
    ac.family = family;
    put_ip(app, &ac.local_ip4, ac.local_ip6);
    put_ip(client, &ac.remote_ip4, ac.remote_ip6);
    ac.local_port = app_port;
    ac.remote_port = htonl(client_port);
  }

  void decide(uint32_t mark, uint16_t remote_port, uint32_t from = kEstablished, uint32_t to = kClose) {
    auto* b = in();
    b->t_mark = mark;
    b->t_remote_port = htonl(remote_port);
    b->t_from = from;
    b->t_to = to;
  }

  void recv_from(const std::string& ip, uint16_t port) {
    auto& a = in()->t_addr;
    std::memset(&a, 0, sizeof(a));
    put_ip(ip, &a.user_ip4, a.user_ip6);
    a.user_port = htons(port);
  }

  void put_orig(const podsteer_origdst_key& k, const std::string& ip, uint16_t port) {
    podsteer_addr o{};
    auto a = addr16(ip);
    std::memcpy(o.addr, a.data(), 16);
    o.port = htons(port);
    o.family = is_v6(ip) ? AF_INET6 : AF_INET;
    ASSERT_EQ(bpf_map__update_elem(skel_->maps.podsteer_orig, &k, sizeof(k), &o, sizeof(o), BPF_ANY), 0);
  }

  conn_test* skel_ = nullptr;
};

void expect_orig_key(const podsteer_origdst_key& k, uint64_t cookie, const std::string& peer, uint16_t peer_port,
                     uint16_t local_port, const char* who) {
  EXPECT_EQ(k.netns_cookie, cookie) << who;
  EXPECT_EQ(text16(k.peer_addr), peer) << who;
  EXPECT_EQ(k.peer_port, peer_port) << who;
  EXPECT_EQ(k.local_port, local_port) << who;
  EXPECT_EQ(k.pad, 0u) << who;
}

TEST_F(ConnHooks, EveryHookBuildsTheSameOriginalDestinationKey) {
  struct Case {
    int family;
    const char *app, *pod;
    uint16_t port;
  } cases[] = {
      {AF_INET, "10.1.0.2", "10.1.0.2", 15001},
      {AF_INET6, "fd00::2", "fd00::2", 15001},
      {AF_INET6, "::ffff:10.1.0.2", "::ffff:10.1.0.2", 15001},  // an AF_INET6 socket to IPv4
      {AF_INET, "127.0.0.1", "127.0.0.1", 15001},              // a pod without an address of that family
      {AF_INET6, "::1", "::1", 15001},
      {AF_INET, "127.0.0.1", "127.0.0.1", 15053},              // DNS over TCP
      {AF_INET6, "::1", "::1", 15053},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.app) + " -> " + c.pod + ":" + std::to_string(c.port));
    outbound(c.family, c.app, 40123, c.pod, c.port);
    const auto& out = run();
    expect_orig_key(out.at_connect, kPod, text16(addr16(c.app).data()), 40123, c.port, "sock_ops");
    expect_orig_key(out.at_sockopt, kPod, text16(addr16(c.app).data()), 40123, c.port, "getsockopt");
    ASSERT_EQ(out.peer_key_made, 1);
    expect_orig_key(out.at_peer, kPod, text16(addr16(c.app).data()), 40123, c.port, "getpeername");
    EXPECT_EQ(std::memcmp(&out.at_connect, &out.at_sockopt, sizeof(out.at_connect)), 0);
    EXPECT_EQ(std::memcmp(&out.at_connect, &out.at_peer, sizeof(out.at_connect)), 0);
    EXPECT_EQ(text16(out.sockopt_local), text16(addr16(c.pod).data()));
  }
}

TEST_F(ConnHooks, GetpeernameLooksUpOnlyAConnectionToAListenerOfOurs) {
  for (uint16_t port : {80, 15006, 15008, 53}) {
    outbound(AF_INET, "10.1.0.2", 40123, "10.2.0.1", port);
    EXPECT_EQ(run().peer_key_made, 0) << port;
  }
}

TEST_F(ConnHooks, TheProxysConnectionFromAClientsAddressHasOneTransitKeyOnBothSides) {
  struct Case {
    int family;
    const char *client, *app;
  } cases[] = {{AF_INET, "10.9.0.7", "10.1.0.2"}, {AF_INET6, "fd00:9::7", "fd00::2"},
               {AF_INET6, "::ffff:10.9.0.7", "::ffff:10.1.0.2"}};
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.client) + " -> " + c.app);
    transit(c.family, c.client, 50001, c.app, 8080);
    const auto& out = run();
    // what sk_lookup (bpf/lookup.bpf.c) builds from the SYN: dst = the app (the local side,
    // local_port in host order), src = the client (remote_port, network order)
    for (const auto* t : {&out.at_proxy_connect, &out.at_accept}) {
      EXPECT_EQ(t->netns_cookie, kPod);
      EXPECT_EQ(text16(t->dst_addr), text16(addr16(c.app).data()));
      EXPECT_EQ(text16(t->src_addr), text16(addr16(c.client).data()));
      EXPECT_EQ(t->dst_port, 8080);
      EXPECT_EQ(t->src_port, 50001);
      EXPECT_EQ(t->pad, 0u);
    }
    EXPECT_EQ(std::memcmp(&out.at_proxy_connect, &out.at_accept, sizeof(out.at_accept)), 0);
  }
}

TEST_F(ConnHooks, ConnectCallbackTellsTheProxyAnAppToOurListenerAndTheRest) {
  decide(PODSTEER_DEFAULT_PROXY_MARK, 8080);
  EXPECT_EQ(run().role, CONN_PROXY);
  decide(0x7000 | PODSTEER_DEFAULT_PROXY_MARK, 15001);  // bits outside the mask do not matter
  EXPECT_EQ(run().role, CONN_PROXY);
  decide(0, 15001);
  EXPECT_EQ(run().role, CONN_APP);
  decide(0, 15053);
  EXPECT_EQ(run().role, CONN_APP);
  decide(PODSTEER_DEFAULT_APP_MARK, 15001);  // the app mark is an app's
  EXPECT_EQ(run().role, CONN_APP);
  decide(PODSTEER_DEFAULT_PROXY_MARK + 1, 15001);
  EXPECT_EQ(run().role, CONN_APP);
  for (uint16_t port : {80, 15006, 15008, 53}) {
    decide(0, port);
    EXPECT_EQ(run().role, CONN_NONE) << port;
  }
}

TEST_F(ConnHooks, OnlyTheCloseActsAndEachSocketDeletesWhatItMade) {
  // every transition but the close: nothing, whoever's socket
  for (uint32_t to : {kEstablished, kSynSent, kFinWait1, 8u, 9u, 11u}) {
    decide(0, 15001, kEstablished, to);
    EXPECT_EQ(run().plan, 0u) << to;
    decide(PODSTEER_DEFAULT_PROXY_MARK, 8080, kEstablished, to);
    EXPECT_EQ(run().plan, 0u) << to;
  }
  decide(PODSTEER_DEFAULT_PROXY_MARK, 8080);  // a proxy socket of an older build: transit only
  EXPECT_EQ(run().plan, uint32_t(CLOSE_TRANSIT));
  decide(PODSTEER_DEFAULT_PROXY_MARK, 15001);
  EXPECT_EQ(run().plan, uint32_t(CLOSE_TRANSIT));
  decide(PODSTEER_DEFAULT_APP_MARK, 8080);  // the proxy's socket after on_connect
  EXPECT_EQ(run().plan, uint32_t(CLOSE_TRANSIT));
  decide(PODSTEER_DEFAULT_APP_MARK, 15001);  // or an app socket with the app mark of its own
  EXPECT_EQ(run().plan, uint32_t(CLOSE_TRANSIT | CLOSE_ORIG));
  decide(0, 15001);
  EXPECT_EQ(run().plan, uint32_t(CLOSE_ORIG));
  decide(0, 15053, kSynSent);  // nothing listened
  EXPECT_EQ(run().plan, uint32_t(CLOSE_ORIG | CLOSE_MISSING));
  decide(0, 80, kSynSent);  // not ours to count
  EXPECT_EQ(run().plan, 0u);
}

TEST_F(ConnHooks, TheProxysSocketTakesTheAppMarkUnderTheMaskOnly) {
  decide(PODSTEER_DEFAULT_PROXY_MARK, 8080);
  EXPECT_EQ(run().transit_mark, uint32_t(PODSTEER_DEFAULT_APP_MARK));
  decide(0x7000 | PODSTEER_DEFAULT_PROXY_MARK, 8080);
  EXPECT_EQ(run().transit_mark, 0x7000u | PODSTEER_DEFAULT_APP_MARK);
  decide(PODSTEER_DEFAULT_APP_MARK | 0x3000, 8080);
  EXPECT_EQ(run().app_marked, 1u);
  decide(PODSTEER_DEFAULT_PROXY_MARK, 8080);
  EXPECT_EQ(run().app_marked, 0u);
  decide(0, 8080);
  EXPECT_EQ(run().app_marked, 0u);
  // a node's own marks: the mask 0xff0, proxy 0x2a0, app 0x150
  load(0x2a0, 0xff0, 0x150);
  decide(0x2a5, 8080);
  EXPECT_EQ(run().role, CONN_PROXY);
  EXPECT_EQ(run().transit_mark, 0x155u);
  decide(0x15f, 15001);
  EXPECT_EQ(run().app_marked, 1u);
  EXPECT_EQ(run().plan, uint32_t(CLOSE_TRANSIT | CLOSE_ORIG));
  decide(PODSTEER_DEFAULT_PROXY_MARK, 15001);
  EXPECT_EQ(run().role, CONN_APP);
}

TEST_F(ConnHooks, RecvmsgRewritesOnlyRepliesFromTheDnsListener) {
  recv_from("127.0.0.1", 15053);
  EXPECT_EQ(run().dns_reply4, 1u);
  for (auto [ip, port] : {std::pair<const char*, uint16_t>{"127.0.0.1", 53}, {"127.0.0.2", 15053},
                         {"10.96.0.10", 15053}, {"127.0.0.1", 15001}}) {
    recv_from(ip, port);
    EXPECT_EQ(run().dns_reply4, 0u) << ip << ":" << port;
  }
  recv_from("::1", 15053);
  EXPECT_EQ(run().dns_reply6, 1u);
  recv_from("::ffff:127.0.0.1", 15053);  // a dual-stack socket
  EXPECT_EQ(run().dns_reply6, 1u);
  for (auto [ip, port] : {std::pair<const char*, uint16_t>{"::1", 53}, {"::2", 15053}, {"fd00::1", 15053},
                         {"::ffff:127.0.0.2", 15053}, {"::ffff:10.96.0.10", 15053}, {"::1:0:0:1", 15053}}) {
    recv_from(ip, port);
    EXPECT_EQ(run().dns_reply6, 0u) << ip << ":" << port;
  }
}

TEST_F(ConnHooks, SoOriginalDstAnswersFromTheEntryTheLocalAddressOrLeavesTheKernels) {
  // an outbound redirect with its entry: the app's original destination
  outbound(AF_INET, "10.1.0.2", 40123, "10.1.0.2", 15001);
  put_orig(run().at_connect, "93.184.216.34", 443);
  auto out = run();
  EXPECT_EQ(out.answer, uint32_t(ANSWER_ORIG));
  EXPECT_EQ(text16(out.orig.addr), "93.184.216.34");
  EXPECT_EQ(ntohs(out.orig.port), 443);
  // the same over IPv6
  outbound(AF_INET6, "fd00::2", 40124, "fd00::2", 15001);
  put_orig(run().at_connect, "2606:2800::1", 8443);
  out = run();
  EXPECT_EQ(out.answer, uint32_t(ANSWER_ORIG));
  EXPECT_EQ(text16(out.orig.addr), "2606:2800::1");
  // to our listener with no entry (an app that called 15001 itself): the local address
  outbound(AF_INET, "10.1.0.2", 40125, "10.1.0.2", 15001);
  EXPECT_EQ(run().answer, uint32_t(ANSWER_LOCAL));
  // inbound (sk_lookup kept the destination): the local address, never the orig table,
  // even with an entry under that key
  outbound(AF_INET, "10.9.0.7", 50001, "10.1.0.2", 8080);
  put_orig(run().at_sockopt, "6.6.6.6", 66);
  out = run();
  EXPECT_EQ(out.answer, uint32_t(ANSWER_LOCAL));
  EXPECT_EQ(text16(out.sockopt_local), "10.1.0.2");
  // a netns not enrolled: the kernel's answer stands
  outbound(AF_INET, "10.1.0.2", 40123, "10.1.0.2", 15001);
  in()->t_cookie = kStranger;
  EXPECT_EQ(run().answer, uint32_t(ANSWER_KERNEL));
}

}  // namespace
