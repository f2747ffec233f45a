#include "zds_server.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <filesystem>

#include "log.h"
#include "wire.h"
#include "zds.pb.h"

namespace podsteer {

namespace pb = istio::workload::zds;

ZdsServer::ZdsServer(std::string path, int ack_timeout_ms, SnapshotFn snapshot)
    : path_(std::move(path)), ack_timeout_ms_(ack_timeout_ms), snapshot_(std::move(snapshot)) {}

ZdsServer::~ZdsServer() { stop(); }

Status ZdsServer::start() {
  PODSTEER_TRY(listener_.start(path_, SOCK_SEQPACKET, [this](Fd conn) {
    auto st = handshake(std::move(conn));
    if (!st) spdlog::warn("zds: proxy connection rejected: {}", st.error().message());
  }));
  spdlog::info("zds: listening on {}", path_);
  return {};
}

void ZdsServer::stop() { listener_.stop(); }

Status ZdsServer::request_locked(const std::string& what, const google::protobuf::MessageLite& m, int fd) {
  if (!conn_.valid()) return invalid("no node proxy is connected to " + path_);
  auto st = zds::send(conn_.get(), m, fd);
  if (!st) {
    conn_.reset();
    return st;
  }
  auto pkt = zds::receive(conn_.get(), ack_timeout_ms_);
  if (!pkt) {
    conn_.reset();  // lockstep is broken: the proxy reconnects and gets a snapshot
    return Error{pkt.error().op, pkt.error().err, what};
  }
  auto resp = zds::parse<pb::WorkloadResponse>(*pkt);
  if (!resp) {
    conn_.reset();
    return Error{resp.error().op, 0, what};
  }
  if (!resp->has_ack()) return invalid("proxy answered without an ack", what);
  if (!resp->ack().error().empty()) return invalid("proxy refused: " + resp->ack().error(), what);
  return {};
}

static pb::WorkloadRequest add_request(const PodInfo& pod) {
  pb::WorkloadRequest req;
  auto* add = req.mutable_add();
  add->set_uid(pod.uid);
  add->mutable_workload_info()->set_name(pod.name);
  add->mutable_workload_info()->set_namespace_(pod.namespace_);
  add->mutable_workload_info()->set_service_account(pod.service_account);
  return req;
}

Status ZdsServer::handshake(Fd conn) {
  auto pkt = zds::receive(conn.get(), ack_timeout_ms_);
  if (!pkt) return pkt.error();
  auto hello = zds::parse<pb::ZdsHello>(*pkt);
  if (!hello) return hello.error();
  if (hello->version() != pb::V1) return invalid("unsupported ZDS version " + std::to_string(hello->version()));
  std::lock_guard<std::mutex> g(mu_);
  conn_ = std::move(conn);  // replaces (and closes) an older proxy connection
  connections_++;
  size_t n = 0;
  for (auto& e : snapshot_()) {
    auto st = request_locked("snapshot add " + e.pod.full_name(), add_request(e.pod), e.netns.get());
    if (!st) return st;
    ++n;
  }
  pb::WorkloadRequest done;
  done.mutable_snapshot_sent();
  PODSTEER_TRY(request_locked("snapshot sent", done, -1));
  spdlog::info("zds: proxy connected, snapshot of {} pod(s) acked", n);
  return {};
}

Status ZdsServer::add(const PodInfo& pod, int netns_fd) {
  std::lock_guard<std::mutex> g(mu_);
  return request_locked("add " + pod.full_name(), add_request(pod), netns_fd);
}

Status ZdsServer::del(const std::string& uid) {
  std::lock_guard<std::mutex> g(mu_);
  pb::WorkloadRequest req;
  req.mutable_del()->set_uid(uid);
  return request_locked("del " + uid, req, -1);
}

bool ZdsServer::connected() {
  std::unique_lock<std::mutex> g(mu_, std::try_to_lock);
  if (!g.owns_lock()) return true;  // a request is in flight on a live connection
  if (!conn_.valid()) return false;
  pollfd p{conn_.get(), POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR))) {
    conn_.reset();
    return false;
  }
  return true;
}

}  // namespace podsteer
