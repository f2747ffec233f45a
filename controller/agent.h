// podsteer-agent: owns the datapath (through the loader), captures the pods its sources
// report (CNI ADD, the Kubernetes watch), hands each captured pod's netns to the node
// proxies over ZDS, and keeps every captured pod whole (drift repair).
//
// Locks, and why there is no lock order to get wrong: each component (ZdsServer,
// kube::Source, CniServer, PodTable) has a lock of its own and never calls into another
// component while holding it. The agent serializes work on one pod with that pod's lock and
// calls into the components from there; none of them calls back into the agent. The
// datapath is serialized across threads and processes by the state dir's lock. The agent
// has two mutexes besides the pods' own: pod_locks_mu_ (the map of the pods' locks) and
// mu_ (a few fields, listed there), and holds neither across a call out; the datapath
// pointer is an atomic shared_ptr.
//
// The pod table (pod_table.h) is the agent's record of what it captured; the BPF maps are
// its projection, which the repair pass checks against it.
//
// Files by job: agent.cpp (lifecycle, HTTP, health, metrics), agent_pods.cpp (capture,
// release), agent_cni.cpp (CNI requests), agent_kube.cpp (the Kubernetes pod source),
// agent_repair.cpp (drift repair, the status cache), agent_proxies.cpp (the proxies trusted
// with the proxy mark).
#pragma once

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include "cni_server.h"
#include "datapath.h"
#include "kube_client.h"
#include "kube_source.h"
#include "pod_source.h"
#include "pod_table.h"
#include "zds_server.h"

namespace podsteer {

struct AgentConfig {
  std::string state_dir = "/sys/fs/bpf/podsteer";
  NodeConfig node;
  std::string cni_socket = "/var/run/podsteer/cni.sock";
  std::string zds_socket = "/var/run/ztunnel/ztunnel.sock";
  std::string http_addr = "127.0.0.1";
  int http_port = 15099;
  std::string metrics_token_file;  // set: /metrics wants "Authorization: Bearer <token>"
  // a second listener that serves /metrics alone, for Prometheus (port 0: none): the node's
  // address, where /healthz, /readyz and /logging stay on http_addr (loopback)
  std::string metrics_addr;
  int metrics_port = 0;
  int ack_timeout_ms = 5000;
  int repair_interval_ms = 500;
  int watchdog_ms = 30000;  // a CNI request or ZDS ack taking longer: the agent is unhealthy
  std::set<std::string> enroll_namespaces;
  bool dns = true;  // the node's default; a pod's ambient.istio.io/dns-capture overrides it
  bool fail_open = false;
  // Kubernetes pod source (off unless one of these is set)
  std::string kubeconfig;
  bool in_cluster = false;
  std::string node_name;
  std::string daemonset;  // NAMESPACE/NAME of the agent's own DaemonSet (removal vs restart)
  kube::LabelPolicy label_policy;
  std::string proc_root = "/proc";
};

// Finds a running pod's netns through /proc: a process whose cgroup path names the pod
// UID, in a netns that holds one of the pod's IPs. Returns "/proc/PID/ns/net".
std::optional<std::string> find_pod_netns(const kube::Pod& pod, const std::string& proc_root = "/proc");
// A path to the netns with this inode, through any process in it, if one runs.
std::optional<std::string> find_netns_by_inode(uint64_t ino, const std::string& proc_root = "/proc");

class Agent {
 public:
  explicit Agent(AgentConfig cfg);
  ~Agent();
  // Adopts (or installs) the datapath, serves CNI, ZDS and HTTP, starts the Kubernetes
  // source and the repair loop.
  Status start();
  void stop();

  // One request line from podsteer-cni in, one answer line out.
  std::string handle_cni(const std::string& line);
  std::string metrics();
  bool healthy(std::string* why = nullptr);
  bool ready(std::string* why = nullptr);
  // Shutting down: is the agent's DaemonSet gone (or going)? Then podsteer-cni leaves the
  // node's CNI config; a restart or an upgrade leaves it in place, so new pods wait for
  // the next agent instead of starting uncaptured (istio-cni decides the same way).
  bool daemonset_removed();
  // On removal (the DaemonSet is gone): releases every pod, removes their annotations and
  // uninstalls the datapath. Before stop(): the proxies are told through ZDS.
  Status remove_from_node();
  // --install-cni on a node whose primary CNI has not written its config yet: not ready
  // until podsteer-cni is chained in
  void set_cni_pending(bool pending) { cni_pending_ = pending; }
  // What the node's CNI chain looks like (main knows the installer's options); in /status.
  // Set before start().
  void set_cni_status(std::function<nlohmann::json()> f) { cni_status_ = std::move(f); }
  // The agent's own view for `podsteer status`: version, the connected proxies, the
  // Kubernetes watch, the CNI chain (GET /status on the loopback listener).
  nlohmann::json status_json();

 private:
  // ---- agent_pods.cpp
  std::shared_ptr<std::mutex> pod_lock(const std::string& key);
  static std::string pod_key(const PodInfo& pod);
  // Enrolls the pod and tells the newest proxy; undone when the proxy does not ack.
  // proxy_may_be_away: a pod under istio-cni's in-pod rules, whose proxy serves it already
  // (the switch from istio-cni): recorded for the next snapshot when no proxy is connected.
  Status capture(const PodInfo& pod, bool proxy_may_be_away = false);
  // Tells every proxy, then unenrolls. by: the pod's uid, else its container id.
  Status release(const PodInfo& pod, const std::string& why);
  // The same, for a caller that holds the pod's lock already.
  Status release_locked(const PodInfo& pod, const std::string& why);
  PodOptions options_for(const PodInfo& pod) const;
  // The pod's Istio annotations (dns-capture, bypass-inbound-capture) into info
  static void take_overrides(PodInfo& info, const kube::Pod& pod);
  static PodInfo pod_from_meta(const PodStatus& s);

  // ---- agent_cni.cpp
  nlohmann::json cni_add(PodInfo pod);
  nlohmann::json cni_del(const PodInfo& pod);
  nlohmann::json cni_check(PodInfo pod);
  // Enrollment by the Kubernetes labels, from the watch cache or the API itself; fills in
  // the service account. An error when neither can say (the runtime retries).
  Result<bool> kube_decides(PodInfo& pod);
  // kube_decides with the Kubernetes source on, else the CNI enrollment policy.
  Result<bool> enrollment(PodInfo& pod);
  void count(const std::string& command, const std::string& result);

  // ---- agent_kube.cpp
  void kube_worker();
  void reconcile_kube(const kube::Snapshot& snap);
  void annotate(const kube::Pod& pod, bool captured);
  void kick_kube();  // a capture or release happened: bring the annotations up to date now
  // A running pod just captured: istio-cni's in-pod rules, if it left them, go now that
  // podsteer's capture is live (istio_takeover.h)
  void take_over_from_istio(const PodInfo& pod);
  void finish_istio_takeovers();  // from the repair pass: the connmark chains left to remove

  // ---- agent_repair.cpp
  void repair_worker();
  void repair_once();
  void count_repair(const std::string& piece, const std::string& pod);
  bool sync_table(const std::vector<PodStatus>& listed);
  // ---- agent_proxies.cpp
  // A ZDS peer's process is trusted with the proxy mark before it is told anything
  Status trust_peer(uint32_t pid);
  // The trusted proxies are the live ZDS peers: one missing is put back (a reinstalled
  // datapath), one whose process is gone leaves (a live peer in its cgroup takes it over)
  void sync_proxies();
  Result<ProxyProcess> process_of(uint32_t pid);

  std::shared_ptr<Datapath> dp();

  AgentConfig cfg_;
  CniEnrollmentPolicy policy_;
  std::atomic<std::shared_ptr<Datapath>> dp_;  // swapped by a reinstall; the datapath serializes itself
  PodTable pods_;  // what this agent captured (its own lock)
  std::unique_ptr<ZdsServer> zds_;
  std::unique_ptr<CniServer> cni_;
  struct Http;
  std::unique_ptr<Http> http_;
  std::function<nlohmann::json()> cni_status_;
  int64_t started_ms_ = 0;  // Unix ms
  std::atomic<bool> adopted_{false}, stopping_{false}, cni_pending_{false};
  std::atomic<bool> removing_{false};  // remove_from_node() has begun: capture nothing

  std::mutex pod_locks_mu_;  // pod_locks_ (the map; each pod's mutex serializes that pod's capture and release)
  std::map<std::string, std::weak_ptr<std::mutex>> pod_locks_;

  // Guards istio_pending_, the CNI and repair counters, kube_dirty_, kube_first_pass_,
  // cache_ and proxy_processes_; the three condition variables wait on it. Held for a copy or an increment only.
  std::mutex mu_;
  std::map<uint64_t, std::string> istio_pending_;  // netns cookie -> netns path: mangle OUTPUT kept
  std::atomic<uint64_t> istio_takeovers_{0};
  std::map<std::pair<std::string, std::string>, uint64_t> cni_requests_;
  std::map<std::string, uint64_t> repairs_;
  // Latencies, rendered as Prometheus histograms at each scrape: a CNI request's by command
  // (ADD: the pod's start waits for it), and the datapath's enroll of one pod
  struct Latency {
    static const std::vector<double>& bounds();  // seconds
    std::vector<double> counts = std::vector<double>(bounds().size() + 1);  // per bucket, +Inf last
    double sum = 0;
    void observe(double seconds);
  };
  std::map<std::string, Latency> cni_latency_;
  Latency enroll_latency_;
  std::map<uint64_t, std::chrono::steady_clock::time_point> cni_in_flight_;
  uint64_t cni_serial_ = 0;

  std::unique_ptr<kube::Client> kube_client_;
  std::unique_ptr<kube::Source> kube_source_;
  std::thread kube_thread_;
  std::condition_variable kube_cv_;
  bool kube_dirty_ = false;
  std::atomic<bool> kube_reconciled_{false};
  // The first Kubernetes pass is done: a proxy's first snapshot waits for it (up to 3 s), so
  // that pods taken over from istio-cni are in it (a proxy drops pods a snapshot leaves out)
  std::condition_variable first_pass_cv_;
  bool kube_first_pass_ = false;
  std::set<std::string> kube_seen_;  // pod uids the cache has shown (kube worker only)

  std::thread repair_thread_;
  std::condition_variable repair_cv_;  // wakes the repair thread to stop
  std::atomic<int64_t> repair_tick_ms_{0};
  std::atomic<uint64_t> repair_passes_{0};  // passes completed
  std::atomic<int64_t> repair_pass_us_{0};  // how long the last one took
  // the pods as the last repair pass saw them (for /metrics): replaced whole, read by copying the pointer
  std::shared_ptr<const std::vector<PodStatus>> cache_ = std::make_shared<const std::vector<PodStatus>>();
  std::map<uint32_t, ProxyProcess> proxy_processes_;  // by pid, checked by start time (under mu_)
};

}  // namespace podsteer
