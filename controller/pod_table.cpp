#include "pod_table.h"

namespace podsteer {

void PodTable::unindex(const PodInfo& p) {
  auto drop = [&](std::map<std::string, uint64_t>& index, const std::string& key) {
    auto it = index.find(key);
    if (it != index.end() && it->second == p.netns_cookie) index.erase(it);
  };
  drop(by_uid_, p.uid);
  drop(by_container_, p.container_id);
  for (const auto& ip : p.ips) drop(by_address_, ip);
}

void PodTable::put(const PodInfo& pod) {
  std::lock_guard<std::mutex> g(mu_);
  if (auto it = by_cookie_.find(pod.netns_cookie); it != by_cookie_.end()) unindex(it->second);
  by_cookie_[pod.netns_cookie] = pod;
  if (!pod.uid.empty()) by_uid_[pod.uid] = pod.netns_cookie;
  if (!pod.container_id.empty()) by_container_[pod.container_id] = pod.netns_cookie;
  for (const auto& ip : pod.ips) by_address_[ip] = pod.netns_cookie;
}

std::optional<PodInfo> PodTable::erase(uint64_t cookie) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = by_cookie_.find(cookie);
  if (it == by_cookie_.end()) return std::nullopt;
  PodInfo p = std::move(it->second);
  by_cookie_.erase(it);
  unindex(p);
  return p;
}

std::optional<PodInfo> PodTable::find(const PodInfo& key) const {
  std::lock_guard<std::mutex> g(mu_);
  auto at = [&](const std::map<std::string, uint64_t>& index, const std::string& k) -> std::optional<PodInfo> {
    if (k.empty()) return std::nullopt;
    auto it = index.find(k);
    if (it == index.end()) return std::nullopt;
    return by_cookie_.at(it->second);
  };
  if (auto p = at(by_uid_, key.uid)) return p;
  if (auto p = at(by_container_, key.container_id)) return p;
  if (key.netns_cookie)
    if (auto it = by_cookie_.find(key.netns_cookie); it != by_cookie_.end()) return it->second;
  return std::nullopt;
}

std::optional<PodInfo> PodTable::by_cookie(uint64_t cookie) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = by_cookie_.find(cookie);
  if (it == by_cookie_.end()) return std::nullopt;
  return it->second;
}

std::optional<PodInfo> PodTable::by_address(const std::string& ip) const {
  std::lock_guard<std::mutex> g(mu_);
  auto it = by_address_.find(ip);
  if (it == by_address_.end()) return std::nullopt;
  return by_cookie_.at(it->second);
}

std::vector<PodInfo> PodTable::all() const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<PodInfo> out;
  out.reserve(by_cookie_.size());
  for (const auto& [_, p] : by_cookie_) out.push_back(p);
  return out;
}

size_t PodTable::size() const {
  std::lock_guard<std::mutex> g(mu_);
  return by_cookie_.size();
}

}  // namespace podsteer
