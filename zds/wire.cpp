#include "wire.h"

#include <poll.h>
#include <sys/socket.h>

#include <cstring>
#include <vector>

namespace podsteer::zds {

Status send(int sock, const google::protobuf::MessageLite& m, int pass_fd) {
  std::string bytes;
  if (!m.SerializeToString(&bytes)) return invalid("serialize " + m.GetTypeName());
  iovec iov{bytes.data(), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (pass_fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) return sys_error("sendmsg ZDS " + m.GetTypeName());
  return {};
}

Result<Packet> receive(int sock, int timeout_ms, size_t max_bytes) {
  pollfd p{sock, POLLIN, 0};
  int r = poll(&p, 1, timeout_ms);
  if (r < 0) return sys_error("poll ZDS socket");
  if (r == 0) return Error{"timed out waiting for the ZDS peer", ETIMEDOUT, ""};
  std::vector<char> buf(max_bytes);
  iovec iov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  if (n < 0) return sys_error("recvmsg ZDS");
  Packet out;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < nfds; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (!out.fd.valid())
        out.fd = Fd(fd);
      else
        Fd discard(fd);  // more than one fd is not part of the protocol
    }
  }
  // ZDS messages are never empty (every one has a field or a oneof tag), so a
  // zero-length read is the peer going away.
  if (n == 0 && !out.fd.valid()) return Error{"peer closed", 0, ""};
  if (msg.msg_flags & MSG_TRUNC)
    return Error{"ZDS message longer than the " + std::to_string(max_bytes) + "-byte read buffer", EMSGSIZE, ""};
  out.bytes.assign(buf.data(), n);
  return out;
}

}  // namespace podsteer::zds
