#include "netns.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <linux/nsfs.h>
#include <net/if.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/vfs.h>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <thread>

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif
#ifndef NSFS_MAGIC
#define NSFS_MAGIC 0x6e736673
#endif
#ifndef PROC_SUPER_MAGIC
#define PROC_SUPER_MAGIC 0x9fa0
#endif

namespace podsteer {

Result<uint64_t> current_netns_cookie() {
  Fd s(socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!s.valid()) s = Fd(socket(AF_INET6, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!s.valid()) return sys_error("socket");
  uint64_t cookie = 0;
  socklen_t len = sizeof(cookie);
  if (getsockopt(s.get(), SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &len) != 0)
    return sys_error("getsockopt(SO_NETNS_COOKIE)");
  return cookie;
}

// A thread other than the process's first one joins the namespace itself and comes back:
// two setns() calls, against a thread's creation and join for every call (about 1 ms per
// pod of the agent's repair pass went there). The first thread never moves, because
// /proc/self/ns/net - the host check in open_netns - is that thread's namespace. A thread
// that cannot come back must not go on running in a pod's namespace: it aborts.
Status in_netns(int netns_fd, const std::function<Status()>& fn) {
  Status result;
  if (gettid() == getpid()) {
    std::thread t([&] {
      if (setns(netns_fd, CLONE_NEWNET) != 0) {
        result = sys_error("setns(CLONE_NEWNET)");
        return;
      }
      result = fn();
    });
    t.join();
    return result;
  }
  Fd home(open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC));
  if (!home.valid()) return sys_error("open /proc/thread-self/ns/net");
  if (setns(netns_fd, CLONE_NEWNET) != 0) return sys_error("setns(CLONE_NEWNET)");
  struct Back {
    int fd;
    ~Back() {
      if (setns(fd, CLONE_NEWNET) != 0) {
        fprintf(stderr, "podsteer: cannot return to this thread's network namespace: %s\n", strerror(errno));
        abort();
      }
    }
  } back{home.get()};
  return fn();
}

Result<Netns> open_netns(const std::string& path) {
  Fd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return sys_error("open network namespace", path);
  struct statfs fs {};
  if (fstatfs(fd.get(), &fs) != 0) return sys_error("fstatfs", path);
  if (fs.f_type != NSFS_MAGIC && fs.f_type != PROC_SUPER_MAGIC)
    return invalid("not a network namespace (expected an nsfs file such as /var/run/netns/NAME or "
                   "/proc/PID/ns/net)", path);
  int type = ioctl(fd.get(), NS_GET_NSTYPE);
  if (type < 0) return sys_error("not a namespace file: ioctl(NS_GET_NSTYPE)", path);
  if (type != CLONE_NEWNET) return invalid("is a namespace, but not a network namespace", path);

  // The node's own namespace: PID 1's, and ours (the agent and CLI run with hostNetwork).
  struct stat ns {}, host {};
  if (fstat(fd.get(), &ns) != 0) return sys_error("fstat", path);
  for (const char* node_ns : {"/proc/1/ns/net", "/proc/self/ns/net"}) {
    if (stat(node_ns, &host) == 0 && ns.st_ino == host.st_ino && ns.st_dev == host.st_dev)
      return invalid("refusing the host network namespace (the node's own, where podsteer runs): podsteer only "
                     "captures pods", path);
  }

  Netns out{std::move(fd), path, 0};
  uint64_t cookie = 0;
  Status st = in_netns(out.fd.get(), [&]() -> Status {
    auto c = current_netns_cookie();
    if (!c) return c.error();
    cookie = *c;
    return {};
  });
  if (!st) return st.error().in(path);
  out.cookie = cookie;
  return out;
}

Result<std::vector<Interface>> list_interfaces(int netns_fd) {
  std::vector<Interface> out;
  Status st = in_netns(netns_fd, [&]() -> Status {
    struct if_nameindex* names = if_nameindex();
    if (!names) return sys_error("if_nameindex");
    std::map<std::string, Interface> by_name;
    for (auto* n = names; n->if_index != 0; ++n)
      by_name[n->if_name] = Interface{n->if_index, n->if_name, false, {}, {}};
    if_freenameindex(names);
    struct ifaddrs* addrs = nullptr;
    if (getifaddrs(&addrs) != 0) return sys_error("getifaddrs");
    for (auto* a = addrs; a; a = a->ifa_next) {
      auto it = by_name.find(a->ifa_name);
      if (it == by_name.end()) continue;
      if (a->ifa_flags & IFF_LOOPBACK) it->second.loopback = true;
      if (!a->ifa_addr) continue;
      if (a->ifa_addr->sa_family == AF_INET) {
        it->second.ip4.push_back(reinterpret_cast<sockaddr_in*>(a->ifa_addr)->sin_addr);
      } else if (a->ifa_addr->sa_family == AF_INET6) {
        auto& a6 = reinterpret_cast<sockaddr_in6*>(a->ifa_addr)->sin6_addr;
        if (!IN6_IS_ADDR_LINKLOCAL(&a6)) it->second.ip6.push_back(a6);
      }
    }
    freeifaddrs(addrs);
    for (auto& [_, i] : by_name) {
      if (i.name == "lo") i.loopback = true;
      out.push_back(std::move(i));
    }
    return {};
  });
  if (!st) return st.error();
  return out;
}

std::string format_ip(const in_addr& a) {
  char buf[INET_ADDRSTRLEN];
  return inet_ntop(AF_INET, &a, buf, sizeof(buf));
}

std::string format_ip(const in6_addr& a) {
  char buf[INET6_ADDRSTRLEN];
  return inet_ntop(AF_INET6, &a, buf, sizeof(buf));
}

std::string format_ip16(const uint8_t* a16) {
  in6_addr a6;
  std::memcpy(&a6, a16, 16);
  if (IN6_IS_ADDR_V4MAPPED(&a6)) {
    in_addr a4;
    std::memcpy(&a4, a16 + 12, 4);
    return format_ip(a4);
  }
  return format_ip(a6);
}

}  // namespace podsteer
