// podsteer-cni: a chained CNI plugin (spec 1.0.0; accepts 0.3.x and 0.4.0). On ADD it asks
// the podsteer agent to capture the pod and waits until the pod is captured (with the
// proxy's ack) or not enrolled, then prints prevResult unchanged. Fail closed: if the agent
// cannot be reached or refuses an enrolled pod, ADD fails and the runtime retries.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>
#include <map>
#include <set>
#include <string>

using ojson = nlohmann::ordered_json;
using json = nlohmann::json;

namespace {

const std::set<std::string> kVersions = {"0.3.0", "0.3.1", "0.4.0", "1.0.0"};
std::string g_version = "1.0.0";

// CNI error codes (spec "Error" section) and ours (100+).
enum Code { kIncompatibleVersion = 1, kInvalidEnv = 4, kDecode = 6, kInvalidConfig = 7, kTryAgain = 11, kAgentRefused = 100 };

[[noreturn]] void fail(int code, const std::string& msg, const std::string& details = "") {
  ojson e = {{"cniVersion", g_version}, {"code", code}, {"msg", msg}};
  if (!details.empty()) e["details"] = details;
  std::cout << e.dump() << std::endl;
  exit(1);
}

std::string env(const char* name) {
  const char* v = getenv(name);
  return v ? v : "";
}

std::map<std::string, std::string> parse_cni_args(const std::string& s) {
  std::map<std::string, std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t semi = s.find(';', start);
    std::string kv = s.substr(start, semi == std::string::npos ? std::string::npos : semi - start);
    auto eq = kv.find('=');
    if (!kv.empty()) {
      if (eq == std::string::npos) fail(kInvalidEnv, "invalid CNI_ARGS", "'" + kv + "' is not KEY=VALUE");
      out[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    if (semi == std::string::npos) break;
    start = semi + 1;
  }
  return out;
}

json ask_agent(const std::string& socket_path, const json& req) {
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof(addr.sun_path) - 1);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    fail(kTryAgain, "podsteer agent is not reachable", socket_path + ": " + std::strerror(errno));
  std::string line = req.dump() + "\n";
  if (write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size()))
    fail(kTryAgain, "podsteer agent is not reachable", std::string("write: ") + std::strerror(errno));
  std::string reply;
  char c;
  while (true) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 60000) <= 0) fail(kTryAgain, "podsteer agent did not answer in 60s");
    ssize_t n = read(fd, &c, 1);
    if (n <= 0 || c == '\n') break;
    reply += c;
  }
  close(fd);
  auto j = json::parse(reply, nullptr, false);
  if (j.is_discarded() || !j.is_object()) fail(kTryAgain, "podsteer agent closed the connection without an answer");
  return j;
}

}  // namespace

int main() {
  std::string command = env("CNI_COMMAND");
  if (command == "VERSION") {
    std::cout << ojson{{"cniVersion", "1.0.0"}, {"supportedVersions", {"0.3.0", "0.3.1", "0.4.0", "1.0.0"}}}.dump()
              << std::endl;
    return 0;
  }
  std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  auto conf = ojson::parse(input, nullptr, false);
  if (conf.is_discarded() || !conf.is_object()) fail(kDecode, "failed to decode the network configuration on stdin", "not a JSON object");
  if (conf.contains("cniVersion") && conf["cniVersion"].is_string()) g_version = conf["cniVersion"];
  if (!kVersions.count(g_version))
    fail(kIncompatibleVersion, "incompatible CNI version", "podsteer-cni supports 0.3.0, 0.3.1, 0.4.0 and 1.0.0, not " + g_version);
  if (command != "ADD" && command != "DEL" && command != "CHECK")
    fail(kInvalidEnv, "invalid CNI_COMMAND", "'" + command + "' is not ADD, DEL, CHECK or VERSION");
  std::string container = env("CNI_CONTAINERID"), netns = env("CNI_NETNS"), ifname = env("CNI_IFNAME");
  if (container.empty()) fail(kInvalidEnv, "CNI_CONTAINERID is not set");
  if (command != "DEL" && netns.empty()) fail(kInvalidEnv, "CNI_NETNS is not set");
  if (command != "DEL" && access(netns.c_str(), F_OK) != 0)
    fail(kInvalidEnv, "CNI_NETNS does not exist", netns + ": " + std::strerror(errno));
  auto args = parse_cni_args(env("CNI_ARGS"));

  bool chained = conf.contains("prevResult") && conf["prevResult"].is_object();
  if ((command == "ADD" || command == "CHECK") && !chained)
    fail(kInvalidConfig, "podsteer-cni must be chained after the primary CNI plugin", "no prevResult in the configuration");

  json req = {{"command", command},
              {"container_id", container},
              {"netns", netns},
              {"ifname", ifname},
              {"pod_name", args["K8S_POD_NAME"]},
              {"pod_namespace", args["K8S_POD_NAMESPACE"]},
              {"pod_uid", args["K8S_POD_UID"]},
              {"service_account", args["K8S_POD_SERVICE_ACCOUNT"]}};
  if (args.count("PODSTEER_ENROLL")) req["enroll"] = args["PODSTEER_ENROLL"] == "true";
  if (conf.contains("enrollNamespaces") && conf["enrollNamespaces"].is_array())
    req["enroll_namespaces"] = json::parse(conf["enrollNamespaces"].dump());
  json ips = json::array();
  if (chained && conf["prevResult"].contains("ips") && conf["prevResult"]["ips"].is_array())
    for (const auto& ip : conf["prevResult"]["ips"])
      if (ip.is_object() && ip.contains("address") && ip["address"].is_string()) ips.push_back(ip["address"].get<std::string>());
  req["ips"] = ips;

  std::string sock = conf.value("agentSocket", std::string("/var/run/podsteer/cni.sock"));
  json reply = ask_agent(sock, req);
  std::string status = reply.value("status", "error");
  if (status == "error") fail(kAgentRefused, "podsteer agent refused the pod", reply.value("message", ""));

  if (command == "ADD") std::cout << conf["prevResult"].dump() << std::endl;  // unchanged
  return 0;
}
