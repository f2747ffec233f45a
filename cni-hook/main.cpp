// podsteer-cni: a chained CNI plugin (spec 1.0.0; accepts 0.3.x and 0.4.0). On ADD it asks
// the podsteer agent to capture the pod and waits until the pod is captured (with the
// proxy's ack) or not enrolled, then prints prevResult unchanged. Fail closed: if the agent
// refuses an enrolled pod, ADD fails and the runtime retries. If the agent cannot be
// reached at all, the plugin asks the API server itself (api_fallback.h): a pod the agent
// would not capture starts; one it would, and any the API cannot tell about, fail. DEL
// never fails for want of an agent: libcni runs DEL in reverse and stops at the first
// error, so a failing DEL would keep the primary plugin from releasing the pod's address.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <iterator>

#include "api_fallback.h"
#include "cni_plugin.h"

using namespace podsteer::cni;
using ojson = nlohmann::ordered_json;
using json = nlohmann::json;

namespace {

std::string g_version = "1.0.0";

[[noreturn]] void fail(const PluginError& e) {
  ojson out = {{"cniVersion", g_version}, {"code", e.code}, {"msg", e.msg}};
  if (!e.details.empty()) out["details"] = e.details;
  std::cout << out.dump() << std::endl;
  exit(1);
}

std::string env(const char* name) {
  const char* v = getenv(name);
  return v ? v : "";
}

// The agent's answer, or false when there is none (err says why; connected: whether the
// agent took the connection at all, after which its silence is not "away").
bool ask_agent(const std::string& socket_path, const json& req, json& answer, PluginError& err, bool& connected) {
  connected = false;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof(addr.sun_path) - 1);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    err = {kTryAgain, "podsteer agent is not reachable", socket_path + ": " + std::strerror(errno)};
    if (fd >= 0) close(fd);
    return false;
  }
  connected = true;
  std::string line = req.dump() + "\n";
  if (write(fd, line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
    err = {kTryAgain, "podsteer agent is not reachable", std::string("write: ") + std::strerror(errno)};
    close(fd);
    return false;
  }
  std::string reply;
  char buf[4096];
  while (reply.find('\n') == std::string::npos && reply.size() < (1 << 20)) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 60000) <= 0) {
      err = {kTryAgain, "podsteer agent did not answer in 60s", ""};
      close(fd);
      return false;
    }
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    reply.append(buf, n);
  }
  close(fd);
  answer = json::parse(reply.substr(0, reply.find('\n')), nullptr, false);
  if (answer.is_discarded() || !answer.is_object()) {
    err = {kTryAgain, "podsteer agent closed the connection without an answer", ""};
    return false;
  }
  return true;
}

}  // namespace

int main() {
  std::string command = env("CNI_COMMAND");
  if (command == "VERSION") {
    std::cout << ojson{{"cniVersion", "1.0.0"}, {"supportedVersions", kSupportedVersions}}.dump() << std::endl;
    return 0;
  }
  std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  PluginConf conf;
  PluginError err;
  bool ok = parse_plugin_conf(input, conf, err);
  g_version = conf.cni_version;
  if (!ok) fail(err);
  if (command != "ADD" && command != "DEL" && command != "CHECK")
    fail({kInvalidEnv, "invalid CNI_COMMAND", "'" + command + "' is not ADD, DEL, CHECK or VERSION"});
  std::string container = env("CNI_CONTAINERID"), netns = env("CNI_NETNS"), ifname = env("CNI_IFNAME");
  if (container.empty()) fail({kInvalidEnv, "CNI_CONTAINERID is not set", ""});
  if (command != "DEL" && netns.empty()) fail({kInvalidEnv, "CNI_NETNS is not set", ""});
  if (command != "DEL" && access(netns.c_str(), F_OK) != 0)
    fail({kInvalidEnv, "CNI_NETNS does not exist", netns + ": " + std::strerror(errno)});
  std::map<std::string, std::string> args;
  if (!parse_cni_args(env("CNI_ARGS"), args, err)) fail(err);
  if ((command == "ADD" || command == "CHECK") && !conf.chained)
    fail({kInvalidConfig, "podsteer-cni must be chained after the primary CNI plugin", "no prevResult in the configuration"});

  json req = {{"command", command},          {"container_id", container},
              {"netns", netns},              {"ifname", ifname},
              {"pod_name", args["K8S_POD_NAME"]}, {"pod_namespace", args["K8S_POD_NAMESPACE"]},
              {"pod_uid", args["K8S_POD_UID"]},   {"service_account", args["K8S_POD_SERVICE_ACCOUNT"]},
              {"ips", conf.ips},             {"enroll_namespaces", conf.enroll_namespaces}};
  if (args.count("PODSTEER_ENROLL")) req["enroll"] = args["PODSTEER_ENROLL"] == "true";

  json reply;
  bool connected = false;
  if (!ask_agent(conf.agent_socket, req, reply, err, connected)) {
    // DEL succeeds regardless: the agent cleans up what it finds when it returns
    if (command == "DEL") return 0;
    if (connected || !conf.kubernetes) fail(err);  // an agent that took the request, or no API to ask
    auto enrolled = enrolled_by_api(conf, args["K8S_POD_NAMESPACE"], args["K8S_POD_NAME"], args["K8S_POD_UID"]);
    if (!enrolled)
      fail({kTryAgain, "podsteer agent is not reachable, and the API server cannot say whether the pod is captured",
            err.details + "; " + enrolled.error().message()});
    if (*enrolled)
      fail({kTryAgain, "podsteer agent is not reachable, and the pod is ambient: it must not start uncaptured",
            err.details});
    // not one the agent captures: it starts as if podsteer were not chained
    if (command == "ADD") std::cout << conf.prev_result.dump() << std::endl;
    return 0;
  }
  auto status = reply.find("status");
  if (status == reply.end() || !status->is_string() || *status == "error") {
    auto msg = reply.find("message");
    fail({kAgentRefused, "podsteer agent refused the pod", msg != reply.end() && msg->is_string() ? msg->get<std::string>() : ""});
  }
  if (command == "ADD") std::cout << conf.prev_result.dump() << std::endl;  // unchanged
  return 0;
}
