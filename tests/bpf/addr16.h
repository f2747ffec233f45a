// 16-byte addresses as the BPF maps keep them (v4-mapped for IPv4), to and from text.
#pragma once

#include <arpa/inet.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>

namespace podsteer::test {

// "10.0.0.1" v4-mapped, an IPv6 text ("::ffff:..." too) as is
inline std::array<uint8_t, 16> addr16(const std::string& text) {
  std::array<uint8_t, 16> a{};
  in_addr v4{};
  if (inet_pton(AF_INET, text.c_str(), &v4) == 1) {
    a[10] = a[11] = 0xff;
    std::memcpy(&a[12], &v4, 4);
  } else {
    EXPECT_EQ(inet_pton(AF_INET6, text.c_str(), a.data()), 1) << text;
  }
  return a;
}

// v4-mapped as IPv4 text
inline std::string text16(const uint8_t* a) {
  char buf[INET6_ADDRSTRLEN];
  static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (std::memcmp(a, prefix, 12) == 0) return inet_ntop(AF_INET, a + 12, buf, sizeof(buf));
  return inet_ntop(AF_INET6, a, buf, sizeof(buf));
}

}  // namespace podsteer::test
