// podsteer-agent: owns the datapath (through the loader), keeps the pods the pod sources
// report in step with it, and hands each captured pod's netns to the node proxy over ZDS.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "cni_server.h"
#include "datapath.h"
#include "pod_source.h"
#include "zds_server.h"

namespace podsteer {

struct AgentConfig {
  std::string state_dir = "/sys/fs/bpf/podsteer";
  NodeConfig node;
  std::string cni_socket = "/var/run/podsteer/cni.sock";
  std::string zds_socket = "/var/run/ztunnel/ztunnel.sock";
  std::string http_addr = "127.0.0.1";
  int http_port = 15099;
  int ack_timeout_ms = 5000;
  std::set<std::string> enroll_namespaces;
  bool dns = false;
  bool fail_open = false;
};

class Agent {
 public:
  explicit Agent(AgentConfig cfg);
  ~Agent();
  // Adopts (or installs) the datapath, rebuilds the pod table from the pins, cleans up pods
  // whose netns is gone, then serves CNI, ZDS and HTTP.
  Status start();
  void stop();
  void wait();  // until stop()

  nlohmann::json handle_cni(const nlohmann::json& req);
  std::string metrics();
  bool ready();

 private:
  nlohmann::json cni_add(const PodInfo& pod);
  nlohmann::json cni_del(const PodInfo& pod);
  nlohmann::json cni_check(const PodInfo& pod);
  std::vector<SnapshotEntry> snapshot();
  std::optional<uint64_t> find_locked(const PodInfo& pod);
  void count(const std::string& command, const std::string& result);

  AgentConfig cfg_;
  CniEnrollmentPolicy policy_;
  std::mutex mu_;  // datapath and pod table
  std::optional<Datapath> dp_;
  std::unique_ptr<ZdsServer> zds_;
  std::unique_ptr<CniServer> cni_;
  struct Http;
  std::unique_ptr<Http> http_;
  std::atomic<bool> adopted_{false};
  std::atomic<bool> stopping_{false};
  std::mutex count_mu_;
  std::map<std::pair<std::string, std::string>, uint64_t> cni_requests_;
};

}  // namespace podsteer
