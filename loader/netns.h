// Network namespaces of pods: open and validate a netns path, run code inside it (setns
// affects only the calling thread), read its cookie, interfaces
// and addresses.
#pragma once

#include <netinet/in.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fd.h"
#include "result.h"

namespace podsteer {

struct Netns {
  Fd fd;
  std::string path;
  uint64_t cookie = 0;
};

struct Interface {
  unsigned ifindex = 0;
  std::string name;
  bool loopback = false;
  std::vector<in_addr> ip4;   // global addresses
  std::vector<in6_addr> ip6;  // global addresses (no link-local)
};

// Opens PATH and checks that it is a network namespace other than the machine's own
// (PID 1's): enrolling the host namespace would capture the node's own traffic.
Result<Netns> open_netns(const std::string& path);

// Runs fn with the calling thread in the namespace (on a new thread if the caller is the
// process's first thread), back in its own when fn returns.
Status in_netns(int netns_fd, const std::function<Status()>& fn);

Result<std::vector<Interface>> list_interfaces(int netns_fd);

// The cookie of the netns this thread is in (SO_NETNS_COOKIE, kernel 5.14+).
Result<uint64_t> current_netns_cookie();

std::string format_ip(const in_addr& a);
std::string format_ip(const in6_addr& a);
// 16-byte form (v4-mapped for IPv4) to text.
std::string format_ip16(const uint8_t* a16);

}  // namespace podsteer
