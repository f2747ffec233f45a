// podsteer-agent: owns the datapath (through the loader), keeps the pods the pod sources
// report in step with it, and hands each captured pod's netns to the node proxy over ZDS.
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <condition_variable>
#include <thread>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "cni_server.h"
#include "kube_client.h"
#include "kube_source.h"
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
  // Kubernetes pod source (off unless one of these is set)
  std::string kubeconfig;
  bool in_cluster = false;
  std::string node_name;
  kube::LabelPolicy label_policy;
  std::string proc_root = "/proc";
};

// Finds a running pod's netns through /proc: a process whose cgroup path names the pod
// UID, in a netns that holds one of the pod's IPs. Returns "/proc/PID/ns/net".
std::optional<std::string> find_pod_netns(const kube::Pod& pod, const std::string& proc_root = "/proc");

class Agent {
 public:
  explicit Agent(AgentConfig cfg);
  ~Agent();
  // Adopts (or installs) the datapath, rebuilds the pod table from the pins, cleans up pods
  // whose netns is gone, then serves CNI, ZDS and HTTP.
  Status start();
  void stop();

  nlohmann::json handle_cni(const nlohmann::json& req);
  std::string metrics();
  bool ready();

 private:
  nlohmann::json cni_add(const PodInfo& pod);
  nlohmann::json cni_del(const PodInfo& pod);
  nlohmann::json cni_check(const PodInfo& pod);
  std::vector<SnapshotEntry> snapshot();
  void reconcile_kube(const kube::Snapshot& snap);
  void kube_worker();
  bool kube_enrolled(const PodInfo& pod);
  void annotate(const kube::Pod& pod, bool captured);
  std::optional<PodStatus> find_locked(const PodInfo& pod);
  bool enrolled(const PodInfo& pod);
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
  std::unique_ptr<kube::Client> kube_client_;
  std::unique_ptr<kube::Source> kube_source_;
  std::thread kube_thread_;
  std::mutex kube_mu_;
  std::condition_variable kube_cv_;
  bool kube_dirty_ = false;
};

}  // namespace podsteer
