#include "kube_client.h"

#include <curl/curl.h>
#include <yaml-cpp/yaml.h>

#include <cstdlib>
#include <fstream>
#include <mutex>
#include <sstream>

#include "log.h"

namespace podsteer::kube {

using json = nlohmann::json;

namespace {

std::once_flag curl_once;

std::string read_first_line(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  std::getline(in, s);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  return s;
}

size_t collect(char* p, size_t size, size_t n, void* user) {
  static_cast<std::string*>(user)->append(p, size * n);
  return size * n;
}

struct Stream {
  LineSplitter lines;
  const std::function<bool(const std::string&)>* on_line;
  const std::atomic<bool>* stop;
  std::atomic<uint64_t>* oversized;
  bool aborted = false;
};

// libcurl's write callback: C code above us, so nothing may unwind through here.
size_t stream_write(char* p, size_t size, size_t n, void* user) noexcept {
  auto* s = static_cast<Stream*>(user);
  try {
    uint64_t before = s->lines.oversized();
    bool go_on = s->lines.feed(p, size * n, *s->on_line);
    if (s->lines.oversized() != before) {
      spdlog::warn("kube: a watch line longer than {} bytes was dropped", kMaxWatchLine);
      ++*s->oversized;
    }
    if (!go_on) {
      s->aborted = true;
      return 0;
    }
  } catch (const std::exception& e) {
    spdlog::warn("kube: watch line dropped: {}", e.what());
    ++*s->oversized;
  }
  return size * n;
}

int stream_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  return static_cast<Stream*>(user)->stop->load() ? 1 : 0;
}

}  // namespace

Result<Config> load_kubeconfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return sys_error("open kubeconfig", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_kubeconfig(ss.str(), path);
}

Result<Config> parse_kubeconfig(const std::string& yaml, const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml);
  } catch (const std::exception& e) {
    return invalid(std::string("cannot read kubeconfig: ") + e.what(), path);
  }
  try {
    if (!root.IsMap()) return invalid("kubeconfig is not a YAML map", path);
    std::string current = root["current-context"].as<std::string>("");
    YAML::Node ctx, cluster, user;
    auto seq = [&](const char* key) { return root[key].IsSequence() ? root[key] : YAML::Node(YAML::NodeType::Sequence); };
    for (const auto& c : seq("contexts"))
      if (c.IsMap() && c["name"].as<std::string>("") == current) ctx = c["context"];
    if (!ctx || !ctx.IsMap()) return invalid("kubeconfig has no current context '" + current + "'", path);
    for (const auto& c : seq("clusters"))
      if (c.IsMap() && c["name"].as<std::string>("") == ctx["cluster"].as<std::string>("")) cluster = c["cluster"];
    for (const auto& u : seq("users"))
      if (u.IsMap() && u["name"].as<std::string>("") == ctx["user"].as<std::string>("")) user = u["user"];
    if (!cluster || !cluster.IsMap()) return invalid("kubeconfig context names no known cluster", path);
    Config c;
    c.server = cluster["server"].as<std::string>("");
    c.ca_file = cluster["certificate-authority"].as<std::string>("");
    c.insecure = cluster["insecure-skip-tls-verify"].as<bool>(false);
    if (user && user.IsMap()) {
      c.token = user["token"].as<std::string>("");
      c.token_file = user["tokenFile"].as<std::string>("");
    }
    if (c.server.empty()) return invalid("kubeconfig cluster has no server", path);
    return c;
  } catch (const std::exception& e) {
    return invalid(std::string("malformed kubeconfig: ") + e.what(), path);
  }
}

Result<Config> in_cluster_config(const std::string& sa_dir) {
  const char* host = std::getenv("KUBERNETES_SERVICE_HOST");
  const char* port = std::getenv("KUBERNETES_SERVICE_PORT");
  if (!host || !port) return invalid("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set (use --kubeconfig)");
  Config c;
  std::string h = host;
  if (h.find(':') != std::string::npos) h = "[" + h + "]";
  c.server = "https://" + h + ":" + port;
  c.token_file = sa_dir + "/token";
  c.ca_file = sa_dir + "/ca.crt";
  return c;
}

Client::Client(Config cfg) : cfg_(std::move(cfg)) {
  std::call_once(curl_once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

std::string Client::bearer() { return cfg_.token_file.empty() ? cfg_.token : read_first_line(cfg_.token_file); }

// One HTTP exchange with the API server: headers, auth, TLS and timeouts are set here once.
class Transfer {
 public:
  Transfer(const Config& cfg, const std::string& url, const std::string& token, const char* content_type)
      : c_(curl_easy_init()), url_(url) {
    h_ = curl_slist_append(h_, "Accept: application/json");
    if (!token.empty()) h_ = curl_slist_append(h_, ("Authorization: Bearer " + token).c_str());
    if (content_type) h_ = curl_slist_append(h_, (std::string("Content-Type: ") + content_type).c_str());
    curl_easy_setopt(c_, CURLOPT_URL, url_.c_str());
    curl_easy_setopt(c_, CURLOPT_HTTPHEADER, h_);
    if (!cfg.ca_file.empty()) curl_easy_setopt(c_, CURLOPT_CAINFO, cfg.ca_file.c_str());
    if (cfg.insecure) {
      curl_easy_setopt(c_, CURLOPT_SSL_VERIFYPEER, 0L);
      curl_easy_setopt(c_, CURLOPT_SSL_VERIFYHOST, 0L);
    }
    curl_easy_setopt(c_, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c_, CURLOPT_CONNECTTIMEOUT_MS, 5000L);
  }
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;
  ~Transfer() {
    curl_slist_free_all(h_);
    curl_easy_cleanup(c_);
  }
  CURL* get() { return c_; }
  // The transfer's result and the HTTP status (0 when no answer came).
  std::pair<CURLcode, long> perform() {
    CURLcode rc = curl_easy_perform(c_);
    long status = 0;
    curl_easy_getinfo(c_, CURLINFO_RESPONSE_CODE, &status);
    return {rc, status};
  }

 private:
  CURL* c_;
  curl_slist* h_ = nullptr;
  std::string url_;
};

Result<json> Client::del(const std::string& path) { return request("DELETE", path, ""); }

Result<json> Client::request(const std::string& method, const std::string& path, const std::string& body) {
  std::string out;
  Transfer t(cfg_, cfg_.server + path, bearer(), method == "PATCH" ? "application/merge-patch+json" : nullptr);
  curl_easy_setopt(t.get(), CURLOPT_CUSTOMREQUEST, method.c_str());
  if (!body.empty()) curl_easy_setopt(t.get(), CURLOPT_POSTFIELDS, body.c_str());
  curl_easy_setopt(t.get(), CURLOPT_WRITEFUNCTION, collect);
  curl_easy_setopt(t.get(), CURLOPT_WRITEDATA, &out);
  curl_easy_setopt(t.get(), CURLOPT_TIMEOUT_MS, 15000L);
  auto [rc, status] = t.perform();
  if (rc != CURLE_OK) return Error{method + " " + path + ": " + curl_easy_strerror(rc), 0, cfg_.server};
  if (status < 200 || status > 299)
    // the HTTP status is not an errno: err stays 0, a missing object is kNotFound
    return Error{fmt::format("{} {}: HTTP {}: {}", method, path, status, out.substr(0, 200)), 0, "",
                 status == 404                     ? ErrorCode::kNotFound
                 : status == 401 || status == 403 ? ErrorCode::kDenied
                                                  : ErrorCode::kUnknown};
  auto j = json::parse(out, nullptr, false);
  if (j.is_discarded()) return invalid(method + " " + path + ": the answer is not JSON");
  return j;
}

bool LineSplitter::feed(const char* data, size_t n, const std::function<bool(const std::string&)>& on_line) {
  size_t start = 0;
  for (size_t i = 0; i < n; ++i) {
    if (data[i] != '\n') continue;
    size_t len = i - start;
    if (skipping_) {
      skipping_ = false;  // the end of a line already counted
    } else if (buf_.size() + len > max_) {
      ++oversized_;
      buf_.clear();
    } else {
      buf_.append(data + start, len);
      std::string line;
      line.swap(buf_);
      if (!line.empty() && !on_line(line)) return false;
    }
    start = i + 1;
  }
  size_t rest = n - start;
  if (skipping_) return true;
  if (buf_.size() + rest > max_) {
    ++oversized_;
    buf_.clear();
    skipping_ = true;
    return true;
  }
  buf_.append(data + start, rest);
  return true;
}

Result<json> Client::get(const std::string& path) { return request("GET", path, ""); }

Result<json> Client::merge_patch(const std::string& path, const json& patch) {
  return request("PATCH", path, patch.dump());
}

long Client::watch(const std::string& path, const std::function<bool(const std::string&)>& on_line,
                   const std::atomic<bool>& stop) {
  Stream s{LineSplitter(), &on_line, &stop, &oversized_};
  Transfer t(cfg_, cfg_.server + path, bearer(), nullptr);
  curl_easy_setopt(t.get(), CURLOPT_WRITEFUNCTION, stream_write);
  curl_easy_setopt(t.get(), CURLOPT_WRITEDATA, &s);
  curl_easy_setopt(t.get(), CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(t.get(), CURLOPT_XFERINFOFUNCTION, stream_progress);
  curl_easy_setopt(t.get(), CURLOPT_XFERINFODATA, &s);
  // a silent stream (no events, no bookmarks) for this long is treated as dead
  curl_easy_setopt(t.get(), CURLOPT_LOW_SPEED_LIMIT, 1L);
  curl_easy_setopt(t.get(), CURLOPT_LOW_SPEED_TIME, 90L);
  auto [rc, status] = t.perform();
  if (rc != CURLE_OK && !s.aborted && !stop) spdlog::debug("watch {}: {}", path, curl_easy_strerror(rc));
  return status;
}

}  // namespace podsteer::kube
