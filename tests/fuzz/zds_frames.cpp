// ZDS frames as each side reads them: the agent reads ZdsHello and WorkloadResponse from a
// proxy, a proxy reads WorkloadRequest; through a real SOCK_SEQPACKET pair and ztunnel's
// 1,024-byte read buffer.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include <google/protobuf/stubs/logging.h>

#include "wire.h"
#include "zds.pb.h"

namespace pb = istio::workload::zds;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 is logged by protobuf: expected here
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > 4096) return 0;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return 0;
  podsteer::Fd a(sv[0]), b(sv[1]);
  if (send(a.get(), data, size, 0) != static_cast<ssize_t>(size)) return 0;
  auto pkt = podsteer::zds::receive(b.get(), 0, podsteer::zds::kZtunnelReadBuffer);
  if (!pkt) {
    if (size <= podsteer::zds::kZtunnelReadBuffer) __builtin_trap();  // fits: must arrive
    return 0;
  }
  if (auto hello = podsteer::zds::parse<pb::ZdsHello>(*pkt)) (void)hello->version();
  if (auto resp = podsteer::zds::parse<pb::WorkloadResponse>(*pkt))
    if (resp->has_ack()) (void)resp->ack().error().size();
  if (auto req = podsteer::zds::parse<pb::WorkloadRequest>(*pkt)) {
    if (req->has_add()) (void)(req->add().uid().size() + req->add().workload_info().service_account().size());
    if (req->has_keep()) (void)req->keep().uid().size();
    if (req->has_del()) (void)req->del().uid().size();
  }
  return 0;
}
