// ZDS framing: one protobuf message per SOCK_SEQPACKET packet, a netns fd travelling with
// AddWorkload as SCM_RIGHTS ancillary data.
#pragma once

#include <google/protobuf/message_lite.h>

#include <string>

#include "fd.h"
#include "result.h"

namespace podsteer::zds {

constexpr const char* kDefaultSocket = "/var/run/ztunnel/ztunnel.sock";

struct Packet {
  std::string bytes;
  Fd fd;  // the passed fd, if any
};

// Sends m (and pass_fd, when >= 0) as one packet.
Status send(int sock, const google::protobuf::MessageLite& m, int pass_fd = -1);

// Receives one packet, waiting up to timeout_ms (-1: forever). A closed peer is an Error
// with op "peer closed".
// max_bytes: the reader's buffer. ztunnel reads into 1,024 bytes; a longer message is an
// error (MSG_TRUNC), never silently cut.
constexpr size_t kZtunnelReadBuffer = 1024;
Result<Packet> receive(int sock, int timeout_ms, size_t max_bytes = 65536);

template <typename M>
Result<M> parse(const Packet& p) {
  M m;
  if (!m.ParseFromString(p.bytes)) return invalid("malformed ZDS message (not a valid " + m.GetTypeName() + ")");
  return m;
}

}  // namespace podsteer::zds
