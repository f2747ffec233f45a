// cri_client: the calls a kubelet makes to a container runtime's CRI socket, one command
// per call (or the pair a kubelet makes to start a pod), JSON out. For tests/e2e/containerd.sh.
//
//   cri_client --socket S run-pod --name N --namespace NS --uid U [--cgroup-parent P]
//              [--label K=V]... --image I -- CMD...      RunPodSandbox, CreateContainer, StartContainer
//   cri_client --socket S exec --container C [--timeout 10] -- CMD...     ExecSync
//   cri_client --socket S remove-pod --sandbox ID                         StopPodSandbox, RemovePodSandbox
//   cri_client --socket S status --sandbox ID                             PodSandboxStatus
//   cri_client --socket S version                                         Version
#include <grpcpp/grpcpp.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <iostream>

#include "api.grpc.pb.h"

using json = nlohmann::json;
namespace rt = runtime::v1;

namespace {

int fail(const std::string& what, const grpc::Status& st) {
  std::cout << json{{"ok", false}, {"call", what}, {"error", st.error_message()}, {"code", st.error_code()}}.dump()
            << std::endl;
  return 1;
}

std::unique_ptr<grpc::ClientContext> ctx(int seconds = 60) {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return c;
}

// The sandbox config a kubelet sends for a pod (metadata, labels, log dir, cgroup parent,
// a pod network namespace).
rt::PodSandboxConfig sandbox_config(const std::string& name, const std::string& ns, const std::string& uid,
                                    const std::string& cgroup_parent, const std::vector<std::string>& labels,
                                    const std::string& log_dir) {
  rt::PodSandboxConfig c;
  auto* m = c.mutable_metadata();
  m->set_name(name);
  m->set_namespace_(ns);
  m->set_uid(uid);
  m->set_attempt(0);
  c.set_hostname(name);
  c.set_log_directory(log_dir);
  (*c.mutable_labels())["io.kubernetes.pod.name"] = name;
  (*c.mutable_labels())["io.kubernetes.pod.namespace"] = ns;
  (*c.mutable_labels())["io.kubernetes.pod.uid"] = uid;
  for (const auto& kv : labels) {
    auto eq = kv.find('=');
    if (eq != std::string::npos) (*c.mutable_labels())[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  auto* lx = c.mutable_linux();
  if (!cgroup_parent.empty()) lx->set_cgroup_parent(cgroup_parent);
  lx->mutable_security_context()->mutable_namespace_options()->set_network(rt::NamespaceMode::POD);
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cri_client: a kubelet's CRI calls, for tests"};
  std::string socket = "/run/containerd/containerd.sock";
  app.add_option("--socket", socket, "the runtime's CRI socket")->capture_default_str();
  app.require_subcommand(1);

  auto* run_pod = app.add_subcommand("run-pod", "RunPodSandbox, then CreateContainer and StartContainer");
  std::string name, ns, uid, cgroup_parent, image, log_dir = "/tmp";
  std::vector<std::string> labels, cmd;
  run_pod->add_option("--name", name)->required();
  run_pod->add_option("--namespace", ns)->required();
  run_pod->add_option("--uid", uid)->required();
  run_pod->add_option("--cgroup-parent", cgroup_parent);
  run_pod->add_option("--label", labels);
  run_pod->add_option("--image", image)->required();
  run_pod->add_option("--log-dir", log_dir)->capture_default_str();
  run_pod->add_option("cmd", cmd)->required();

  auto* exec = app.add_subcommand("exec", "ExecSync");
  std::string container;
  int timeout = 10;
  exec->add_option("--container", container)->required();
  exec->add_option("--timeout", timeout)->capture_default_str();
  exec->add_option("cmd", cmd)->required();

  auto* remove_pod = app.add_subcommand("remove-pod", "StopPodSandbox, then RemovePodSandbox");
  std::string sandbox;
  remove_pod->add_option("--sandbox", sandbox)->required();
  auto* status = app.add_subcommand("status", "PodSandboxStatus");
  status->add_option("--sandbox", sandbox)->required();
  auto* version = app.add_subcommand("version", "Version");
  CLI11_PARSE(app, argc, argv);

  auto channel = grpc::CreateChannel("unix://" + socket, grpc::InsecureChannelCredentials());
  auto runtime = rt::RuntimeService::NewStub(channel);

  if (*version) {
    rt::VersionRequest req;
    rt::VersionResponse resp;
    auto st = runtime->Version(ctx(10).get(), req, &resp);
    if (!st.ok()) return fail("Version", st);
    std::cout << json{{"ok", true}, {"runtime", resp.runtime_name()}, {"version", resp.runtime_version()},
                      {"api", resp.runtime_api_version()}}
                     .dump()
              << std::endl;
    return 0;
  }
  if (*run_pod) {
    auto config = sandbox_config(name, ns, uid, cgroup_parent, labels, log_dir);
    rt::RunPodSandboxRequest req;
    *req.mutable_config() = config;
    rt::RunPodSandboxResponse resp;
    auto st = runtime->RunPodSandbox(ctx().get(), req, &resp);
    if (!st.ok()) return fail("RunPodSandbox", st);
    std::string sandbox_id = resp.pod_sandbox_id();
    rt::CreateContainerRequest creq;
    creq.set_pod_sandbox_id(sandbox_id);
    *creq.mutable_sandbox_config() = config;
    auto* cc = creq.mutable_config();
    cc->mutable_metadata()->set_name("app");
    cc->mutable_image()->set_image(image);
    cc->add_command(cmd.at(0));
    for (size_t i = 1; i < cmd.size(); ++i) cc->add_args(cmd[i]);
    cc->set_log_path("app.log");
    rt::CreateContainerResponse cresp;
    st = runtime->CreateContainer(ctx().get(), creq, &cresp);
    if (!st.ok()) return fail("CreateContainer", st);
    rt::StartContainerRequest sreq;
    sreq.set_container_id(cresp.container_id());
    rt::StartContainerResponse sresp;
    st = runtime->StartContainer(ctx().get(), sreq, &sresp);
    if (!st.ok()) return fail("StartContainer", st);
    rt::PodSandboxStatusRequest qreq;
    qreq.set_pod_sandbox_id(sandbox_id);
    rt::PodSandboxStatusResponse qresp;
    st = runtime->PodSandboxStatus(ctx().get(), qreq, &qresp);
    if (!st.ok()) return fail("PodSandboxStatus", st);
    std::cout << json{{"ok", true}, {"sandbox", sandbox_id}, {"container", cresp.container_id()},
                      {"ip", qresp.status().network().ip()}}
                     .dump()
              << std::endl;
    return 0;
  }
  if (*exec) {
    rt::ExecSyncRequest req;
    req.set_container_id(container);
    for (const auto& c : cmd) req.add_cmd(c);
    req.set_timeout(timeout);
    rt::ExecSyncResponse resp;
    auto st = runtime->ExecSync(ctx(timeout + 10).get(), req, &resp);
    if (!st.ok()) return fail("ExecSync", st);
    std::cout << json{{"ok", true}, {"exit_code", resp.exit_code()}, {"stdout", resp.stdout()}, {"stderr", resp.stderr()}}
                     .dump()
              << std::endl;
    return resp.exit_code() == 0 ? 0 : 1;
  }
  if (*remove_pod) {
    rt::StopPodSandboxRequest sreq;
    sreq.set_pod_sandbox_id(sandbox);
    rt::StopPodSandboxResponse sresp;
    auto st = runtime->StopPodSandbox(ctx().get(), sreq, &sresp);
    if (!st.ok()) return fail("StopPodSandbox", st);
    rt::RemovePodSandboxRequest rreq;
    rreq.set_pod_sandbox_id(sandbox);
    rt::RemovePodSandboxResponse rresp;
    st = runtime->RemovePodSandbox(ctx().get(), rreq, &rresp);
    if (!st.ok()) return fail("RemovePodSandbox", st);
    std::cout << json{{"ok", true}}.dump() << std::endl;
    return 0;
  }
  if (*status) {
    rt::PodSandboxStatusRequest req;
    req.set_pod_sandbox_id(sandbox);
    rt::PodSandboxStatusResponse resp;
    auto st = runtime->PodSandboxStatus(ctx().get(), req, &resp);
    if (!st.ok()) return fail("PodSandboxStatus", st);
    std::cout << json{{"ok", true}, {"state", rt::PodSandboxState_Name(resp.status().state())},
                      {"ip", resp.status().network().ip()}}
                     .dump()
              << std::endl;
    return 0;
  }
  return 2;
}
