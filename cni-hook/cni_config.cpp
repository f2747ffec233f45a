#include "cni_config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

namespace podsteer::cni {
namespace fs = std::filesystem;
using json = nlohmann::ordered_json;  // keep the primary CNI's key order

namespace {

constexpr const char* kType = "podsteer-cni";

bool is_config_name(const fs::path& p) {
  auto ext = p.extension().string();
  return ext == ".conf" || ext == ".conflist" || ext == ".json";
}

bool is_ours(const json& plugin) {
  if (!plugin.is_object()) return false;
  auto t = plugin.find("type");
  return t != plugin.end() && t->is_string() && *t == kType;
}

struct Snapshot {
  std::string content;
  struct stat st {};
};

Result<Snapshot> read_file(const std::string& path) {
  Snapshot s;
  if (stat(path.c_str(), &s.st) != 0) return sys_error("stat", path);
  std::ifstream in(path);
  if (!in) return sys_error("open", path);
  std::stringstream ss;
  ss << in.rdbuf();
  s.content = ss.str();
  return s;
}

bool unchanged(const std::string& path, const struct stat& before) {
  struct stat now {};
  return stat(path.c_str(), &now) == 0 && now.st_ino == before.st_ino && now.st_size == before.st_size &&
         now.st_mtim.tv_sec == before.st_mtim.tv_sec && now.st_mtim.tv_nsec == before.st_mtim.tv_nsec;
}

// The primary config as a plugin list: a conflist as it is, a single plugin (.conf,
// .json) wrapped into one, as istio-cni converts it.
Result<json> as_conflist(const std::string& path, const std::string& content) {
  auto j = json::parse(content, nullptr, false);
  if (j.is_discarded() || !j.is_object()) return invalid("not a JSON object", path);
  if (auto p = j.find("plugins"); p != j.end()) {
    if (!p->is_array()) return invalid("conflist's \"plugins\" is not a list", path);
    return j;
  }
  json list = json::object();
  for (const char* key : {"cniVersion", "name"})
    if (auto it = j.find(key); it != j.end()) list[key] = *it;
  list["plugins"] = json::array({j});
  return list;
}

// temporary file in the same dir (a name libcni ignores), fsync, rename, fsync the dir
Status write_atomic(const std::string& path, const std::string& content, mode_t mode) {
  std::string dir = fs::path(path).parent_path().string();
  std::string tmp = dir + "/.podsteer-" + fs::path(path).filename().string() + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return sys_error("create", tmp);
  fchmod(fd, mode);  // what the umask took away
  size_t off = 0;
  while (off < content.size()) {
    ssize_t n = write(fd, content.data() + off, content.size() - off);
    if (n <= 0) {
      auto e = sys_error("write", tmp);
      close(fd);
      unlink(tmp.c_str());
      return e;
    }
    off += n;
  }
  if (fsync(fd) != 0) {
    auto e = sys_error("fsync", tmp);
    close(fd);
    unlink(tmp.c_str());
    return e;
  }
  close(fd);
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    auto e = sys_error("rename", path);
    unlink(tmp.c_str());
    return e;
  }
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    fsync(dfd);
    close(dfd);
  }
  return {};
}

}  // namespace

Result<std::string> primary_conflist(const std::string& conf_dir) {
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(conf_dir, ec))
    if (e.is_regular_file() && is_config_name(e.path())) files.push_back(e.path().string());
  if (ec) return Error{"read CNI config dir", ec.value(), conf_dir};
  if (files.empty()) return invalid("no .conf, .conflist or .json in the CNI config dir (is the primary CNI installed?)", conf_dir);
  std::sort(files.begin(), files.end());  // libcni's ConfFiles order: the runtime uses the first
  return files.front();
}

Result<bool> chain_into(const std::string& content, const std::string& agent_socket, std::string& out) {
  auto list = as_conflist("", content);
  if (!list) return list.error();
  auto& plugins = (*list)["plugins"];
  for (const auto& p : plugins)
    if (is_ours(p)) return false;
  plugins.push_back({{"type", kType}, {"agentSocket", agent_socket}});
  out = list->dump(2) + "\n";
  return true;
}

Result<bool> ensure_chained(const InstallOptions& o) {
  // The primary CNI may rewrite its file at any moment: if it changed between our read
  // and our rename, start over from its new content instead of writing over it.
  for (int attempt = 0; attempt < 20; ++attempt) {
    auto path = primary_conflist(o.conf_dir);
    if (!path) return path.error();
    auto snap = read_file(*path);
    if (!snap) return snap.error();
    std::string updated;
    auto changed = chain_into(snap->content, o.agent_socket, updated);
    if (!changed) return Error{changed.error().op, 0, *path};
    if (!*changed) return false;
    std::string target = *path;
    if (fs::path(target).extension() != ".conflist") target = fs::path(target).replace_extension(".conflist").string();
    if (!unchanged(*path, snap->st)) continue;
    PODSTEER_TRY(write_atomic(target, updated, snap->st.st_mode & 07777));
    if (target != *path) unlink(path->c_str());  // converted: the list replaces the single plugin
    return true;
  }
  return invalid("the primary CNI config kept changing under us; will retry", o.conf_dir);
}

Status install(const InstallOptions& o) {
  if (o.plugin_binary.empty()) return invalid("no podsteer-cni binary given");
  std::ifstream in(o.plugin_binary, std::ios::binary);
  if (!in) return sys_error("open", o.plugin_binary);
  std::stringstream bin;
  bin << in.rdbuf();
  std::error_code ec;
  fs::create_directories(o.bin_dir, ec);
  PODSTEER_TRY(write_atomic(o.bin_dir + "/" + kType, bin.str(), 0755));
  auto r = ensure_chained(o);
  if (!r) return r.error();
  return {};
}

Status uninstall(const InstallOptions& o) {
  std::error_code ec;
  // an empty conf_dir iterates nothing; an empty bin_dir removes nothing
  for (const auto& e : fs::directory_iterator(o.conf_dir, ec)) {
    if (!is_config_name(e.path())) continue;
    auto snap = read_file(e.path().string());
    if (!snap) continue;
    auto conf = json::parse(snap->content, nullptr, false);
    if (conf.is_discarded() || !conf.is_object() || !conf.contains("plugins") || !conf["plugins"].is_array()) continue;
    auto& plugins = conf["plugins"];
    json kept = json::array();
    for (const auto& p : plugins)
      if (!is_ours(p)) kept.push_back(p);
    if (kept.size() == plugins.size()) continue;
    plugins = kept;
    PODSTEER_TRY(write_atomic(e.path().string(), conf.dump(2) + "\n", snap->st.st_mode & 07777));
  }
  if (!o.bin_dir.empty()) fs::remove(o.bin_dir + "/" + kType, ec);
  return {};
}

}  // namespace podsteer::cni
