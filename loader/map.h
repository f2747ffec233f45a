// Typed wrappers over BPF map fds. The key and value sizes are checked against the
// kernel's map once, when the wrapper is made; lookups return "absent" (nullopt) for
// ENOENT and an Error for anything else.
#pragma once

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "fd.h"
#include "result.h"

namespace podsteer {

struct MapInfo {
  std::string name;
  unsigned type = 0;
  unsigned key_size = 0;
  unsigned value_size = 0;
  unsigned max_entries = 0;
  unsigned id = 0;
};

Result<MapInfo> map_info(int fd);

// Opens a pinned map and checks its sizes; shared by Map and PercpuMap.
Result<Fd> open_checked_map(const std::string& pin, size_t key_size, size_t value_size);

// Deleting an absent key is not an error: removal is idempotent.
Status erase_elem(int fd, const void* key, const std::string& pin);

template <typename K, typename V>
class Map {
 public:
  static Result<Map> open(const std::string& pin) {
    auto fd = open_checked_map(pin, sizeof(K), sizeof(V));
    if (!fd) return fd.error();
    return Map(std::move(*fd), pin);
  }

  Result<std::optional<V>> lookup(const K& key) const {
    V v{};
    if (bpf_map_lookup_elem(fd_.get(), &key, &v) == 0) return std::optional<V>(v);
    if (errno == ENOENT) return std::optional<V>();
    return sys_error("bpf_map_lookup_elem", pin_);
  }
  Status update(const K& key, const V& v, __u64 flags = BPF_ANY) {
    if (bpf_map_update_elem(fd_.get(), &key, &v, flags) != 0)
      return sys_error("bpf_map_update_elem", pin_);
    return {};
  }
  Status erase(const K& key) { return erase_elem(fd_.get(), &key, pin_); }
  Result<std::vector<K>> keys() const {
    std::vector<K> out;
    K cur{}, next{};
    const K* prev = nullptr;
    while (bpf_map_get_next_key(fd_.get(), prev, &next) == 0) {
      out.push_back(next);
      cur = next;
      prev = &cur;
    }
    if (errno != ENOENT) return sys_error("bpf_map_get_next_key", pin_);
    return out;
  }
  int fd() const { return fd_.get(); }
  const std::string& pin() const { return pin_; }

 private:
  Map(Fd fd, std::string pin) : fd_(std::move(fd)), pin_(std::move(pin)) {}
  Fd fd_;
  std::string pin_;
};

// A per-CPU map: one V per possible CPU; values are read and written as a whole row.
template <typename K, typename V>
class PercpuMap {
 public:
  static Result<PercpuMap> open(const std::string& pin) {
    auto fd = open_checked_map(pin, sizeof(K), sizeof(V));
    if (!fd) return fd.error();
    int ncpu = libbpf_num_possible_cpus();
    if (ncpu <= 0) return Error{"libbpf_num_possible_cpus", -ncpu, pin};
    return PercpuMap(std::move(*fd), pin, static_cast<size_t>(ncpu));
  }
  Result<std::optional<std::vector<V>>> lookup(const K& key) const {
    std::vector<V> row(ncpu_);
    if (bpf_map_lookup_elem(fd_.get(), &key, row.data()) == 0)
      return std::optional<std::vector<V>>(std::move(row));
    if (errno == ENOENT) return std::optional<std::vector<V>>();
    return sys_error("bpf_map_lookup_elem", pin_);
  }
  Status reset(const K& key, __u64 flags = BPF_ANY) {
    std::vector<V> row(ncpu_);
    if (bpf_map_update_elem(fd_.get(), &key, row.data(), flags) != 0)
      return sys_error("bpf_map_update_elem", pin_);
    return {};
  }
  Status erase(const K& key) { return erase_elem(fd_.get(), &key, pin_); }
  int fd() const { return fd_.get(); }

 private:
  PercpuMap(Fd fd, std::string pin, size_t ncpu) : fd_(std::move(fd)), pin_(std::move(pin)), ncpu_(ncpu) {}
  Fd fd_;
  std::string pin_;
  size_t ncpu_;
};

}  // namespace podsteer
