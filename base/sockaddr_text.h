// "ip:port" / "[ip6]:port" for a socket address, with v4-mapped IPv6 shown as IPv4: the
// form every log line and test report uses.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <string>

namespace podsteer {

inline std::string sockaddr_text(const sockaddr_storage& ss) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (ss.ss_family == AF_INET) {
    auto* s = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &s->sin_addr, buf, sizeof(buf));
    return std::string(buf) + ":" + std::to_string(ntohs(s->sin_port));
  }
  auto* s6 = reinterpret_cast<const sockaddr_in6*>(&ss);
  if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
    inet_ntop(AF_INET, &s6->sin6_addr.s6_addr[12], buf, sizeof(buf));
    return std::string(buf) + ":" + std::to_string(ntohs(s6->sin6_port));
  }
  inet_ntop(AF_INET6, &s6->sin6_addr, buf, sizeof(buf));
  return "[" + std::string(buf) + "]:" + std::to_string(ntohs(s6->sin6_port));
}

}  // namespace podsteer
