#include "cni_config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <thread>
#include <cstdio>
#include <functional>
#include <optional>
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

const char* const kTokenFile = "podsteer-cni.token";
const char* const kCaFile = "podsteer-cni-ca.crt";

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

Result<bool> chain_into(const std::string& content, const std::string& agent_socket, std::string& out,
                        const nlohmann::json& settings) {
  auto list = as_conflist("", content);
  if (!list) return list.error();
  json entry = {{"type", kType}, {"agentSocket", agent_socket}};
  if (settings.is_object())
    for (const auto& [k, v] : settings.items()) entry[k] = v;
  auto& plugins = (*list)["plugins"];
  // Ours runs last (it needs the primary's result), once, with these settings: then nothing
  // changes. Otherwise every entry of ours goes and one is added at the end: settings that
  // moved (the API server's address), a copy someone put in the middle, or two copies.
  size_t ours = 0;
  for (const auto& p : plugins) ours += is_ours(p);
  if (ours == 1 && !plugins.empty() && plugins.back() == entry) return false;
  json kept = json::array();
  for (auto& p : plugins)
    if (!is_ours(p)) kept.push_back(std::move(p));
  kept.push_back(entry);
  plugins = std::move(kept);
  out = list->dump(2) + "\n";
  return true;
}

// Writes content to a temporary file next to path (a name libcni ignores), fsynced.
Result<std::string> write_temp(const std::string& path, const std::string& content, mode_t mode) {
  std::string tmp = fs::path(path).parent_path().string() + "/.podsteer-" + fs::path(path).filename().string() + ".swap";
  std::error_code ec;
  fs::remove(tmp, ec);
  // write_atomic into a name of our own, then that name is swapped with the real one
  PODSTEER_TRY(write_atomic(tmp, content, mode));
  return tmp;
}

// Replaces path's content (as read in snap) with transform(content), nullopt meaning "as
// it is". The primary CNI may rewrite its file at any moment: our version goes in with an
// atomic exchange (renameat2 RENAME_EXCHANGE), which hands back what it displaced. If that
// is not what our version was made from, the primary wrote in between, and the next round
// transforms what it wrote. No rewrite of the primary's is ever lost.
using Transform = std::function<Result<std::optional<std::string>>(const std::string&)>;
Result<bool> rewrite(const std::string& path, const Snapshot& snap, const Transform& transform,
                     const std::function<void()>& before_replace) {
  // No round limit: giving up right after an exchange would drop what it displaced (a
  // newer write of the primary's). Every round ends on the primary's latest content, and
  // the loop ends at the first moment the primary is quiet - CNI installers write their
  // config once at start, so in practice after one or two rounds. A writer that never
  // stops only slows us down (1 ms per round after the first 20).
  std::string expected = snap.content, base = snap.content;
  for (int round = 0;; ++round) {
    if (round >= 20) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    auto t = transform(base);
    if (!t) return t.error();
    std::string updated = t->value_or(base);
    if (!*t && base == expected) return round > 0;
    auto tmp = write_temp(path, updated, snap.st.st_mode & 07777);
    if (!tmp) return tmp.error();
    if (before_replace) before_replace();
    if (renameat2(AT_FDCWD, tmp->c_str(), AT_FDCWD, path.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS) {
        auto e = sys_error("exchange", path);
        unlink(tmp->c_str());
        return e;
      }
      // a filesystem without RENAME_EXCHANGE: a plain rename, if nothing changed since
      // our read (a rewrite in the moment between the check and the rename is lost)
      if (!unchanged(path, snap.st) || rename(tmp->c_str(), path.c_str()) != 0) {
        unlink(tmp->c_str());
        return invalid("the CNI config changed under us; will retry", path);
      }
      return true;
    }
    auto displaced = read_file(*tmp);
    unlink(tmp->c_str());
    if (!displaced) return displaced.error();
    if (displaced->content == expected) return true;
    expected = updated;
    base = displaced->content;
  }
}

Result<bool> ensure_chained(const InstallOptions& o) {
  auto path = primary_conflist(o.conf_dir);
  if (!path) return path.error();
  auto snap = read_file(*path);
  if (!snap) return snap.error();
  mode_t mode = snap->st.st_mode & 07777;
  if (fs::path(*path).extension() != ".conflist") {
    // a single plugin: it becomes a .conflist (which sorts after the .conf of the same
    // name: if the primary CNI writes its .conf again, the next pass converts that one)
    std::string updated;
    auto changed = chain_into(snap->content, o.agent_socket, updated, o.plugin_settings);
    if (!changed) return changed.error().in(*path);
    std::string target = fs::path(*path).replace_extension(".conflist").string();
    PODSTEER_TRY(write_atomic(target, updated, mode));
    if (unchanged(*path, snap->st)) unlink(path->c_str());
    return true;
  }
  return rewrite(*path, *snap, [&](const std::string& base) -> Result<std::optional<std::string>> {
    std::string updated;
    auto changed = chain_into(base, o.agent_socket, updated, o.plugin_settings);
    if (!changed) return changed.error().in(*path);
    if (!*changed) return std::optional<std::string>();
    return std::optional<std::string>(updated);
  }, o.before_replace);
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
    auto r = rewrite(e.path().string(), *snap, [](const std::string& base) -> Result<std::optional<std::string>> {
      auto conf = json::parse(base, nullptr, false);
      if (conf.is_discarded() || !conf.is_object() || !conf.contains("plugins") || !conf["plugins"].is_array())
        return std::optional<std::string>();
      auto& plugins = conf["plugins"];
      json kept = json::array();
      for (const auto& p : plugins)
        if (!is_ours(p)) kept.push_back(p);
      if (kept.size() == plugins.size()) return std::optional<std::string>();
      plugins = kept;
      return std::optional<std::string>(conf.dump(2) + "\n");
    }, o.before_replace);
    if (!r) return r.error();
  }
  if (!o.bin_dir.empty()) fs::remove(o.bin_dir + "/" + kType, ec);
  if (!o.conf_dir.empty())
    for (const char* f : {kTokenFile, kCaFile}) fs::remove(o.conf_dir + "/" + f, ec);
  return {};
}

Status set_api_access(InstallOptions& o, const std::string& server, const std::string& token, const std::string& ca_pem,
                      const std::string& enroll_label, const std::string& system_namespace,
                      const std::vector<std::string>& exclude_namespaces) {
  auto keep = [](const std::string& path, const std::string& content, mode_t mode) -> Status {
    std::ifstream in(path);
    std::stringstream have;
    have << in.rdbuf();
    if (in && have.str() == content) return {};  // unchanged: no write
    return write_atomic(path, content, mode);
  };
  json k = {{"server", server}};
  if (!token.empty()) {
    k["tokenFile"] = o.conf_dir + "/" + kTokenFile;
    PODSTEER_TRY(keep(o.conf_dir + "/" + kTokenFile, token + "\n", 0600));
  }
  if (!ca_pem.empty()) {
    k["caFile"] = o.conf_dir + "/" + kCaFile;
    PODSTEER_TRY(keep(o.conf_dir + "/" + kCaFile, ca_pem, 0644));
  }
  json enrollment = {{"label", enroll_label}, {"systemNamespace", system_namespace}};
  if (!exclude_namespaces.empty()) enrollment["excludeNamespaces"] = exclude_namespaces;
  o.plugin_settings = {{"kubernetes", k}, {"enrollment", enrollment}};
  return {};
}

}  // namespace podsteer::cni
