#include <gtest/gtest.h>

#include "datapath.h"

using namespace podsteer;

TEST(ParsePorts, AcceptsListAndDeduplicates) {
  auto r = parse_ports("8080,53,8080");
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, (std::vector<uint16_t>{53, 8080}));
  EXPECT_TRUE(parse_ports("").ok());
}

TEST(ParsePorts, RejectsGarbageWithTheBadItem) {
  for (const char* bad : {"0", "65536", "80,", "a", "80,-1", "1234567", "80 ,81"}) {
    auto r = parse_ports(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.error().message().find("port"), std::string::npos) << r.error().message();
  }
}

TEST(ParseCidr, Ipv4IsStoredV4MappedWithHostBitsCleared) {
  auto c = parse_cidr("10.1.2.3/8");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->prefix, 96u + 8);
  const uint8_t want[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 0};
  EXPECT_EQ(0, memcmp(c->addr, want, 16));
  auto host = parse_cidr("192.0.2.7");
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(host->prefix, 128u);
}

TEST(ParseCidr, Ipv6) {
  auto c = parse_cidr("fd00:1::ff/32");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->prefix, 32u);
  EXPECT_EQ(c->addr[0], 0xfd);
  EXPECT_EQ(c->addr[15], 0);  // host bits cleared
}

TEST(ParseCidr, RejectsBadInput) {
  for (const char* bad : {"10.0.0.0/33", "fd00::/129", "banana", "10.0.0.0/", "10.0.0.0/x", "/8", "10.0.0/8"})
    EXPECT_FALSE(parse_cidr(bad).ok()) << bad;
}

TEST(CidrKey, CookieBitsPrecedeTheAddress) {
  auto c = parse_cidr("10.0.0.0/8");
  ASSERT_TRUE(c.ok());
  auto k = cidr_key(0x0102030405060708ull, *c);
  EXPECT_EQ(k.prefixlen, 64u + 96 + 8);
  const uint8_t* b = reinterpret_cast<const uint8_t*>(&k) + 4;
  for (int i = 0; i < 8; ++i) EXPECT_EQ(b[i], i + 1);
}
