// kube-testserver: a small Kubernetes API server for tests, speaking the real protocol for
// pods and namespaces: discovery, list, ?watch=1 chunked event streams resuming from a
// resourceVersion, BOOKMARK events, 410 Gone after compaction, label and field selectors,
// JSON merge / strategic merge PATCH (for labels and annotations), create and delete, and
// bearer-token auth re-read from a file on every request. Good enough for the real kubectl
// (get -w, label, annotate). Fault injection under /testctl/ for the watch-fault tests.
#include <httplib.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <condition_variable>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>

using json = nlohmann::json;

namespace {

struct Event {
  uint64_t rv;
  std::string type;
  json object;
};

std::mutex mu;
std::condition_variable changed;
uint64_t rv = 100;
uint64_t compacted = 0;                 // watches from at or below this get 410
std::map<std::string, json> objects;    // "pods/ns/name", "namespaces/name"
std::vector<Event> events;
uint64_t watch_generation = 0;          // bumped to cut every open watch
bool split_chunks = false;              // write events in tiny chunks at awkward places
bool cut_mid_event = false;             // the next cut stops a stream halfway through an event
uint64_t garbage_generation = 0;        // bumped to send every open watch a malformed line
uint64_t gone_generation = 0;           // bumped to expire every open watch (ERROR 410)
std::string token_file;
bool api_down = false;
uint64_t status_patches = 0;            // PATCHes of pods/status
json status_patch_log = json::array();   // each one as it came: path, content type, body bytes
uint64_t lists = 0;                     // list requests (not watches), for relist backoff checks                  // every API request answers 503 (the API is unreachable)
bool hold_watches = false;              // open watches deliver nothing (a lagging watch cache)
uint64_t gets = 0;                      // GETs of one pod or namespace
uint64_t pod_patches = 0;               // PATCHes of pods themselves (not their status)
uint64_t error_generation = 0;          // bumped to end every open watch with a non-410 ERROR

std::string now_rfc3339() {
  auto t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

json status(int code, const std::string& reason, const std::string& msg) {
  return {{"kind", "Status"}, {"apiVersion", "v1"}, {"metadata", json::object()}, {"status", "Failure"},
          {"message", msg}, {"reason", reason}, {"code", code}};
}

void reply(httplib::Response& res, int code, const json& j) {
  res.status = code;
  res.set_content(j.dump(), "application/json");
}

bool authorized(const httplib::Request& req, httplib::Response& res) {
  {
    std::lock_guard<std::mutex> g(mu);
    if (api_down) {
      reply(res, 503, status(503, "ServiceUnavailable", "the API server is down (testctl)"));
      return false;
    }
  }
  if (token_file.empty()) return true;
  std::ifstream in(token_file);
  std::string token;
  std::getline(in, token);
  std::string got = req.get_header_value("Authorization");
  // Like an API server with anonymous access on its insecure port: no credentials is
  // allowed (the test's kubectl over http sends none), wrong credentials are not - so a
  // client still holding a rotated-out token is refused.
  if (got.empty()) return true;
  if (got == "Bearer " + token) return true;
  reply(res, 401, status(401, "Unauthorized", "Unauthorized"));
  return false;
}

// Equality-based label selectors: a=b, a==b, a!=b, a, !a, comma-separated.
bool labels_match(const json& obj, const std::string& sel) {
  json labels = obj["metadata"].value("labels", json::object());
  std::stringstream ss(sel);
  std::string term;
  while (std::getline(ss, term, ',')) {
    if (term.empty()) continue;
    auto ne = term.find("!=");
    auto eq = term.find('=');
    if (ne != std::string::npos) {
      std::string k = term.substr(0, ne), v = term.substr(ne + 2);
      if (labels.contains(k) && labels[k] == v) return false;
    } else if (eq != std::string::npos) {
      std::string k = term.substr(0, eq), v = term.substr(term[eq + 1] == '=' ? eq + 2 : eq + 1);
      if (!labels.contains(k) || labels[k] != v) return false;
    } else if (term[0] == '!') {
      if (labels.contains(term.substr(1))) return false;
    } else if (!labels.contains(term)) {
      return false;
    }
  }
  return true;
}

bool fields_match(const json& obj, const std::string& sel) {
  std::stringstream ss(sel);
  std::string term;
  while (std::getline(ss, term, ',')) {
    auto eq = term.find('=');
    if (eq == std::string::npos) continue;
    std::string k = term.substr(0, eq), v = term.substr(term[eq + 1] == '=' ? eq + 2 : eq + 1);
    std::string have;
    if (k == "spec.nodeName") have = obj.value("spec", json::object()).value("nodeName", "");
    else if (k == "metadata.name") have = obj["metadata"].value("name", "");
    else if (k == "metadata.namespace") have = obj["metadata"].value("namespace", "");
    if (have != v) return false;
  }
  return true;
}

void record(const std::string& type, const json& obj) {
  events.push_back({rv, type, obj});
  changed.notify_all();
}

std::string key(const std::string& kind, const std::string& ns, const std::string& name) {
  if (kind == "daemonsets") return "daemonsets/" + ns + "/" + name;
  return kind == "pods" ? "pods/" + ns + "/" + name : "namespaces/" + name;
}

// What kubectl asks for (Accept: ...;as=Table): a meta.k8s.io/v1 Table of the objects.
json as_table(const std::vector<json>& objs, uint64_t version) {
  json rows = json::array();
  for (const auto& o : objs) {
    json meta = o["metadata"];
    rows.push_back({{"cells", {meta.value("name", ""), o.value("status", json::object()).value("phase", "Active"),
                               o.value("status", json::object()).value("podIP", "")}},
                    {"object", {{"kind", "PartialObjectMetadata"}, {"apiVersion", "meta.k8s.io/v1"}, {"metadata", meta}}}});
  }
  return {{"kind", "Table"}, {"apiVersion", "meta.k8s.io/v1"}, {"metadata", {{"resourceVersion", std::to_string(version)}}},
          {"columnDefinitions",
           {{{"name", "Name"}, {"type", "string"}, {"format", "name"}, {"description", "name"}, {"priority", 0}},
            {{"name", "Status"}, {"type", "string"}, {"format", ""}, {"description", "phase"}, {"priority", 0}},
            {{"name", "IP"}, {"type", "string"}, {"format", ""}, {"description", "pod IP"}, {"priority", 0}}}},
          {"rows", rows}};
}

void handle_list_or_watch(const httplib::Request& req, httplib::Response& res, const std::string& kind, const std::string& ns) {
  std::string lsel = req.get_param_value("labelSelector"), fsel = req.get_param_value("fieldSelector");
  auto matches = [lsel, fsel, kind, ns](const json& o) {
    if (kind == "pods" && !ns.empty() && o["metadata"].value("namespace", "") != ns) return false;
    return labels_match(o, lsel) && fields_match(o, fsel);
  };
  bool table = req.get_header_value("Accept").find("as=Table") != std::string::npos;
  std::string w = req.get_param_value("watch");
  if (w != "1" && w != "true") {
    std::lock_guard<std::mutex> g(mu);
    ++lists;
    json items = json::array();
    std::string prefix = kind + "/";
    for (const auto& [k, o] : objects)
      if (k.rfind(prefix, 0) == 0 && matches(o)) items.push_back(o);
    if (table) return reply(res, 200, as_table(items.get<std::vector<json>>(), rv));
    reply(res, 200, {{"kind", kind == "pods" ? "PodList" : "NamespaceList"}, {"apiVersion", "v1"},
                     {"metadata", {{"resourceVersion", std::to_string(rv)}}}, {"items", items}});
    return;
  }
  uint64_t from = 0;
  std::string rvs = req.get_param_value("resourceVersion");
  {
    std::lock_guard<std::mutex> g(mu);
    from = rvs.empty() || rvs == "0" ? rv : std::stoull(rvs);
    if (from < compacted) {
      reply(res, 410, status(410, "Expired", "too old resource version: " + rvs + " (" + std::to_string(compacted) + ")"));
      return;
    }
  }
  bool bookmarks = req.get_param_value("allowWatchBookmarks") == "true";
  int timeout = req.has_param("timeoutSeconds") ? std::stoi(req.get_param_value("timeoutSeconds")) : 300;
  uint64_t gen, garbage, gone, erroring;
  {
    std::lock_guard<std::mutex> g(mu);
    gen = watch_generation;
    garbage = garbage_generation;
    gone = gone_generation;
    erroring = error_generation;
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout);
  auto last_bookmark = std::chrono::steady_clock::now();
  auto cursor = std::make_shared<uint64_t>(from);
  // "stream=watch", as the real API server says; it also keeps httplib from gzip-buffering
  // the stream, which would hold events back from kubectl (it asks for gzip).
  res.set_chunked_content_provider("application/json;stream=watch", [=](size_t, httplib::DataSink& sink) mutable {
    std::unique_lock<std::mutex> g(mu);
    changed.wait_for(g, std::chrono::milliseconds(200));
    if (watch_generation != gen) {
      if (cut_mid_event) {
        cut_mid_event = false;
        std::string half = R"({"type":"MODIFIED","object":{"kind":"Pod","metadata":{"na)";
        sink.write(half.data(), half.size());
      }
      return false;  // the connection drops
    }
    if (erroring != error_generation) {  // an ERROR that is not 410: the client must not resume here
      std::string e = json{{"type", "ERROR"}, {"object", status(500, "InternalError", "etcd is unhappy")}}.dump() + "\n";
      sink.write(e.data(), e.size());
      sink.done();
      return true;
    }
    if (*cursor < compacted || gone != gone_generation) {
      std::string e = json{{"type", "ERROR"}, {"object", status(410, "Expired", "too old resource version")}}.dump() + "\n";
      sink.write(e.data(), e.size());
      sink.done();
      return true;
    }
    if (hold_watches) return true;  // events wait; the cursor stays where it is
    std::string out;
    if (garbage != garbage_generation) {
      garbage = garbage_generation;
      out += "{this is not an event\n" + json{{"type", "ADDED"}, {"object", {{"metadata", 7}}}}.dump() + "\n" +
             json{{"type", "SURPRISE"}, {"object", json::object()}}.dump() + "\n";
    }
    for (const auto& e : events) {
      if (e.rv <= *cursor || !matches(e.object)) continue;
      out += json{{"type", e.type}, {"object", table ? as_table({e.object}, e.rv) : e.object}}.dump() + "\n";
    }
    if (!events.empty()) *cursor = std::max(*cursor, events.back().rv);
    *cursor = std::max(*cursor, rv);
    if (bookmarks && std::chrono::steady_clock::now() - last_bookmark > std::chrono::seconds(1)) {
      out += json{{"type", "BOOKMARK"},
                  {"object", {{"kind", kind == "pods" ? "Pod" : "Namespace"}, {"apiVersion", "v1"},
                              {"metadata", {{"resourceVersion", std::to_string(*cursor)}}}}}}
                 .dump() +
             "\n";
      last_bookmark = std::chrono::steady_clock::now();
    }
    bool split = split_chunks;
    g.unlock();
    if (split) {
      for (size_t i = 0; i < out.size(); i += 7)
        if (!sink.write(out.data() + i, std::min<size_t>(7, out.size() - i))) return false;
    } else if (!out.empty() && !sink.write(out.data(), out.size())) {
      return false;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      sink.done();
    }
    return true;
  });
}

void upsert(const std::string& kind, json obj, httplib::Response& res, bool create) {
  std::lock_guard<std::mutex> g(mu);
  std::string ns = obj["metadata"].value("namespace", "default"), name = obj["metadata"].value("name", "");
  if (name.empty()) return reply(res, 422, status(422, "Invalid", "metadata.name is required"));
  std::string k = key(kind, ns, name);
  if (create && objects.count(k)) return reply(res, 409, status(409, "AlreadyExists", name + " already exists"));
  ++rv;
  if (kind == "pods" || kind == "daemonsets") obj["metadata"]["namespace"] = ns;
  if (!obj["metadata"].contains("uid")) obj["metadata"]["uid"] = "uid-" + name;
  if (!obj["metadata"].contains("creationTimestamp")) obj["metadata"]["creationTimestamp"] = now_rfc3339();
  obj["metadata"]["resourceVersion"] = std::to_string(rv);
  obj["kind"] = kind == "pods" ? "Pod" : kind == "daemonsets" ? "DaemonSet" : "Namespace";
  obj["apiVersion"] = kind == "daemonsets" ? "apps/v1" : "v1";
  bool existed = objects.count(k);
  objects[k] = obj;
  record(existed ? "MODIFIED" : "ADDED", obj);
  reply(res, create ? 201 : 200, obj);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kube-testserver"};
  int port = 0;
  std::string port_file;
  app.add_option("--port", port);
  app.add_option("--port-file", port_file, "write the chosen port here");
  app.add_option("--token-file", token_file, "require Authorization: Bearer <first line of this file>");
  std::string tls_cert, tls_key;
  app.add_option("--tls-cert", tls_cert, "serve HTTPS with this certificate (PEM) ...");
  app.add_option("--tls-key", tls_key, "... and this key");
  CLI11_PARSE(app, argc, argv);

  std::unique_ptr<httplib::Server> server;
  if (!tls_cert.empty()) server = std::make_unique<httplib::SSLServer>(tls_cert.c_str(), tls_key.c_str());
  else server = std::make_unique<httplib::Server>();
  if (!server->is_valid()) {
    fprintf(stderr, "kube-testserver: cannot serve with %s and %s\n", tls_cert.c_str(), tls_key.c_str());
    return 1;
  }
  httplib::Server& srv = *server;
  srv.Get("/version", [](const httplib::Request&, httplib::Response& res) {
    reply(res, 200, {{"major", "1"}, {"minor", "32"}, {"gitVersion", "v1.32.0-podsteer-test"}, {"platform", "linux/amd64"}});
  });
  srv.Get("/api", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    reply(res, 200, {{"kind", "APIVersions"}, {"versions", {"v1"}},
                     {"serverAddressByClientCIDRs", {{{"clientCIDR", "0.0.0.0/0"}, {"serverAddress", "127.0.0.1"}}}}});
  });
  srv.Get("/apis", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    auto group = [](const std::string& name) {
      json v = {{"groupVersion", name + "/v1"}, {"version", "v1"}};
      return json{{"name", name}, {"versions", {v}}, {"preferredVersion", v}};
    };
    reply(res, 200, {{"kind", "APIGroupList"}, {"apiVersion", "v1"},
                     {"groups", {group("apps"), group("rbac.authorization.k8s.io")}}});
  });
  srv.Get("/api/v1", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    json verbs = {"create", "delete", "get", "list", "patch", "update", "watch"};
    reply(res, 200, {{"kind", "APIResourceList"}, {"groupVersion", "v1"},
                     {"resources", {{{"name", "pods"}, {"singularName", "pod"}, {"namespaced", true}, {"kind", "Pod"},
                                     {"verbs", verbs}, {"shortNames", {"po"}}},
                                    {{"name", "namespaces"}, {"singularName", "namespace"}, {"namespaced", false},
                                     {"kind", "Namespace"}, {"verbs", verbs}, {"shortNames", {"ns"}}},
                                    {{"name", "serviceaccounts"}, {"singularName", "serviceaccount"}, {"namespaced", true},
                                     {"kind", "ServiceAccount"}, {"verbs", verbs}},
                                    {{"name", "configmaps"}, {"singularName", "configmap"}, {"namespaced", true},
                                     {"kind", "ConfigMap"}, {"verbs", verbs}}}}});
  });
  // Discovery only, for `kubectl apply --dry-run=client` of deploy/: these kinds are known
  // but not stored (a GET of one is 404, as for an object not created yet).
  srv.Get("/apis/apps/v1", [](const httplib::Request&, httplib::Response& res) {
    reply(res, 200, {{"kind", "APIResourceList"}, {"groupVersion", "apps/v1"},
                     {"resources", {{{"name", "daemonsets"}, {"singularName", "daemonset"}, {"namespaced", true},
                                     {"kind", "DaemonSet"}, {"verbs", {"get", "list", "create", "patch"}}}}}});
  });
  srv.Get("/apis/rbac.authorization.k8s.io/v1", [](const httplib::Request&, httplib::Response& res) {
    json verbs = {"get", "list", "create", "patch"};
    reply(res, 200, {{"kind", "APIResourceList"}, {"groupVersion", "rbac.authorization.k8s.io/v1"},
                     {"resources", {{{"name", "clusterroles"}, {"singularName", "clusterrole"}, {"namespaced", false},
                                     {"kind", "ClusterRole"}, {"verbs", verbs}},
                                    {{"name", "clusterrolebindings"}, {"singularName", "clusterrolebinding"},
                                     {"namespaced", false}, {"kind", "ClusterRoleBinding"}, {"verbs", verbs}},
                                    {{"name", "roles"}, {"singularName", "role"}, {"namespaced", true},
                                     {"kind", "Role"}, {"verbs", verbs}},
                                    {{"name", "rolebindings"}, {"singularName", "rolebinding"}, {"namespaced", true},
                                     {"kind", "RoleBinding"}, {"verbs", verbs}}}}});
  });
  srv.Get("/api/v1/pods", [](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) handle_list_or_watch(req, res, "pods", "");
  });
  srv.Get("/api/v1/namespaces", [](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) handle_list_or_watch(req, res, "namespaces", "");
  });
  srv.Get(R"(/api/v1/namespaces/([^/]+)/pods)", [](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) handle_list_or_watch(req, res, "pods", req.matches[1]);
  });
  auto get_one = [](const std::string& k, httplib::Response& res, const std::string& name) {
    std::lock_guard<std::mutex> g(mu);
    gets++;
    auto it = objects.find(k);
    if (it == objects.end()) return reply(res, 404, status(404, "NotFound", "\"" + name + "\" not found"));
    reply(res, 200, it->second);
  };
  srv.Get(R"(/api/v1/namespaces/([^/]+)/pods/([^/]+))", [&](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) get_one(key("pods", req.matches[1], req.matches[2]), res, req.matches[2]);
  });
  srv.Get(R"(/api/v1/namespaces/([^/]+))", [&](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) get_one(key("namespaces", "", req.matches[1]), res, req.matches[1]);
  });
  auto patch = [](const std::string& kind, const std::string& ns, const std::string& name, const httplib::Request& req,
                  httplib::Response& res) {
    auto p = json::parse(req.body, nullptr, false);
    if (p.is_discarded() || !p.is_object()) return reply(res, 400, status(400, "BadRequest", "patch is not a JSON object"));
    std::string ct = req.get_header_value("Content-Type");
    if (ct.find("json-patch+json") != std::string::npos)
      return reply(res, 415, status(415, "UnsupportedMediaType", "only merge and strategic merge patches"));
    json obj;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = objects.find(key(kind, ns, name));
      if (it == objects.end()) return reply(res, 404, status(404, "NotFound", "\"" + name + "\" not found"));
      obj = it->second;
    }
    p.erase("$patch");
    obj.merge_patch(p);  // labels and annotations are maps: merge and strategic merge agree
    upsert(kind, obj, res, false);
  };
  srv.Patch(R"(/api/v1/namespaces/([^/]+)/pods/([^/]+))", [&](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    {
      std::lock_guard<std::mutex> g(mu);
      pod_patches++;
    }
    patch("pods", req.matches[1], req.matches[2], req, res);
  });
  // The status subresource, as the API server's pod status strategy treats it: metadata and
  // status change, the spec stays what it was.
  srv.Patch(R"(/api/v1/namespaces/([^/]+)/pods/([^/]+)/status)", [&](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    auto p = json::parse(req.body, nullptr, false);
    if (p.is_discarded() || !p.is_object()) return reply(res, 400, status(400, "BadRequest", "patch is not a JSON object"));
    json obj;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = objects.find(key("pods", req.matches[1], req.matches[2]));
      if (it == objects.end()) return reply(res, 404, status(404, "NotFound", "not found"));
      obj = it->second;
    }
    json spec = obj.value("spec", json::object());
    obj.merge_patch(p);
    obj["spec"] = spec;
    {
      std::lock_guard<std::mutex> g(mu);
      status_patches++;
      status_patch_log.push_back(
          {{"path", req.path}, {"content_type", req.get_header_value("Content-Type")}, {"body", req.body}});
    }
    upsert("pods", obj, res, false);
  });
  srv.Patch(R"(/api/v1/namespaces/([^/]+))", [&](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) patch("namespaces", "", req.matches[1], req, res);
  });
  srv.Post(R"(/api/v1/namespaces/([^/]+)/pods)", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    auto o = json::parse(req.body, nullptr, false);
    if (o.is_discarded() || !o.contains("metadata")) return reply(res, 400, status(400, "BadRequest", "not a pod"));
    o["metadata"]["namespace"] = std::string(req.matches[1]);
    upsert("pods", o, res, true);
  });
  srv.Post("/api/v1/namespaces", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    auto o = json::parse(req.body, nullptr, false);
    if (o.is_discarded() || !o.contains("metadata")) return reply(res, 400, status(400, "BadRequest", "not a namespace"));
    upsert("namespaces", o, res, true);
  });
  srv.Delete(R"(/api/v1/namespaces/([^/]+)/pods/([^/]+))", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    std::lock_guard<std::mutex> g(mu);
    auto it = objects.find(key("pods", req.matches[1], req.matches[2]));
    if (it == objects.end()) return reply(res, 404, status(404, "NotFound", "not found"));
    ++rv;
    json o = it->second;
    o["metadata"]["resourceVersion"] = std::to_string(rv);
    objects.erase(it);
    record("DELETED", o);
    reply(res, 200, o);
  });
  srv.Get(R"(/apis/apps/v1/namespaces/([^/]+)/daemonsets/([^/]+))", [&](const httplib::Request& req, httplib::Response& res) {
    if (authorized(req, res)) get_one(key("daemonsets", req.matches[1], req.matches[2]), res, req.matches[2]);
  });
  srv.Post(R"(/apis/apps/v1/namespaces/([^/]+)/daemonsets)", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    auto o = json::parse(req.body, nullptr, false);
    if (o.is_discarded() || !o.contains("metadata")) return reply(res, 400, status(400, "BadRequest", "not a daemonset"));
    o["metadata"]["namespace"] = std::string(req.matches[1]);
    upsert("daemonsets", o, res, true);
  });
  srv.Delete(R"(/apis/apps/v1/namespaces/([^/]+)/daemonsets/([^/]+))", [](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    std::lock_guard<std::mutex> g(mu);
    objects.erase(key("daemonsets", req.matches[1], req.matches[2]));
    reply(res, 200, status(200, "Success", "deleted"));
  });
  srv.Get(R"(/apis/.*|/api/v1/namespaces/[^/]+/(serviceaccounts|configmaps)/.*)",
          [](const httplib::Request&, httplib::Response& res) { reply(res, 404, status(404, "NotFound", "not found")); });
  // fault injection
  srv.Post("/testctl/compact", [](const httplib::Request&, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    // everything up to now is forgotten: open watches get ERROR 410, and so does a watch
    // that resumes from an older resourceVersion; a fresh list starts over
    compacted = rv;
    events.clear();
    ++gone_generation;
    changed.notify_all();
    reply(res, 200, {{"compacted", compacted}});
  });
  srv.Post("/testctl/cut-watches", [](const httplib::Request& req, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    cut_mid_event = req.get_param_value("mid_event") == "true";
    ++watch_generation;
    changed.notify_all();
    reply(res, 200, json::object());
  });
  srv.Post("/testctl/garbage", [](const httplib::Request&, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    ++garbage_generation;
    changed.notify_all();
    reply(res, 200, json::object());
  });
  srv.Post("/testctl/split-chunks", [](const httplib::Request& req, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    split_chunks = req.get_param_value("on") == "true";
    reply(res, 200, json::object());
  });
  srv.Post("/testctl/down", [](const httplib::Request& req, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    api_down = req.get_param_value("on") == "true";
    reply(res, 200, json::object());
  });
  srv.Post("/testctl/hold-watches", [](const httplib::Request& req, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    hold_watches = req.get_param_value("on") == "true";
    changed.notify_all();
    reply(res, 200, json::object());
  });
  srv.Post("/testctl/error-event", [](const httplib::Request&, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    ++error_generation;
    changed.notify_all();
    reply(res, 200, json::object());
  });
  srv.Get("/testctl/stats", [](const httplib::Request&, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    reply(res, 200, {{"status_patches", status_patches}, {"lists", lists}, {"gets", gets}, {"pod_patches", pod_patches}});
  });
  srv.Get("/testctl/status-patches", [](const httplib::Request&, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    reply(res, 200, status_patch_log);
  });
  srv.Get("/testctl/watchers", [](const httplib::Request&, httplib::Response& res) {
    std::lock_guard<std::mutex> g(mu);
    reply(res, 200, {{"generation", watch_generation}, {"rv", rv}});
  });

  if (port == 0) port = srv.bind_to_any_port("127.0.0.1");
  else if (!srv.bind_to_port("127.0.0.1", port)) return 1;
  if (!port_file.empty()) std::ofstream(port_file) << port << std::endl;
  fprintf(stderr, "kube-testserver listening on 127.0.0.1:%d\n", port);
  srv.listen_after_bind();
}
