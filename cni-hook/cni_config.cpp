#include "cni_config.h"

#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

namespace podsteer::cni {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kType = "podsteer-cni";

Result<json> read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) return sys_error("open", path);
  std::stringstream ss;
  ss << in.rdbuf();
  auto j = json::parse(ss.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) return invalid("not a JSON object", path);
  return j;
}

// Write-then-rename, so the runtime never reads a half-written file.
Status write_atomic(const std::string& path, const std::string& content, fs::perms perms) {
  std::string tmp = path + ".podsteer-tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    if (!out) return sys_error("create", tmp);
    out << content;
    if (!out) return sys_error("write", tmp);
  }
  std::error_code ec;
  fs::permissions(tmp, perms, ec);
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    auto e = sys_error("rename", path);
    unlink(tmp.c_str());
    return e;
  }
  return {};
}

}  // namespace

Result<std::string> primary_conflist(const std::string& conf_dir) {
  std::vector<std::string> lists;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(conf_dir, ec))
    if (e.path().extension() == ".conflist") lists.push_back(e.path().string());
  if (ec) return Error{"read CNI config dir", ec.value(), conf_dir};
  if (lists.empty()) return invalid("no .conflist in the CNI config dir (is the primary CNI installed?)", conf_dir);
  std::sort(lists.begin(), lists.end());
  return lists.front();
}

Result<bool> ensure_chained(const InstallOptions& o) {
  auto path = primary_conflist(o.conf_dir);
  if (!path) return path.error();
  auto conf = read_json(*path);
  if (!conf) return conf.error();
  if (!conf->contains("plugins") || !(*conf)["plugins"].is_array())
    return invalid("conflist has no \"plugins\" array", *path);
  auto& plugins = (*conf)["plugins"];
  for (const auto& p : plugins)
    if (p.is_object() && p.value("type", "") == kType) return false;
  plugins.push_back({{"type", kType}, {"agentSocket", o.agent_socket}});
  PODSTEER_TRY(write_atomic(*path, conf->dump(2) + "\n", fs::perms::owner_read | fs::perms::owner_write |
                                                               fs::perms::group_read | fs::perms::others_read));
  return true;
}

Status install(const InstallOptions& o) {
  if (o.plugin_binary.empty()) return invalid("no podsteer-cni binary given");
  std::ifstream in(o.plugin_binary, std::ios::binary);
  if (!in) return sys_error("open", o.plugin_binary);
  std::stringstream bin;
  bin << in.rdbuf();
  std::error_code ec;
  fs::create_directories(o.bin_dir, ec);
  PODSTEER_TRY(write_atomic(o.bin_dir + "/" + kType, bin.str(), fs::perms::owner_all | fs::perms::group_read |
                                                                    fs::perms::group_exec | fs::perms::others_read |
                                                                    fs::perms::others_exec));
  auto r = ensure_chained(o);
  if (!r) return r.error();
  return {};
}

Status uninstall(const InstallOptions& o) {
  std::error_code ec;
  // an empty conf_dir iterates nothing; an empty bin_dir removes nothing
  for (const auto& e : fs::directory_iterator(o.conf_dir, ec)) {
    if (e.path().extension() != ".conflist") continue;
    auto conf = read_json(e.path().string());
    if (!conf || !conf->contains("plugins") || !(*conf)["plugins"].is_array()) continue;
    auto& plugins = (*conf)["plugins"];
    size_t before = plugins.size();
    json kept = json::array();
    for (const auto& p : plugins)
      if (!(p.is_object() && p.value("type", "") == kType)) kept.push_back(p);
    if (kept.size() == before) continue;
    plugins = kept;
    PODSTEER_TRY(write_atomic(e.path().string(), conf->dump(2) + "\n",
                              fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read));
  }
  if (!o.bin_dir.empty()) fs::remove(o.bin_dir + "/" + kType, ec);
  return {};
}

}  // namespace podsteer::cni
