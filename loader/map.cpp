#include "map.h"

namespace podsteer {

Result<MapInfo> map_info(int fd) {
  bpf_map_info info{};
  __u32 len = sizeof(info);
  if (bpf_obj_get_info_by_fd(fd, &info, &len) != 0) return sys_error("bpf_obj_get_info_by_fd");
  return MapInfo{info.name, info.type, info.key_size, info.value_size, info.max_entries, info.id};
}

Result<Fd> open_checked_map(const std::string& pin, size_t key_size, size_t value_size) {
  Fd fd(bpf_obj_get(pin.c_str()));
  if (!fd.valid()) return sys_error("bpf_obj_get", pin);
  auto info = map_info(fd.get());
  if (!info) return info.error().in(pin);
  if (info->key_size != key_size || info->value_size != value_size)
    return invalid(fmt::format("map layout mismatch: key {} value {} bytes, this build expects {} and {}"
                               " (state made by another podsteer version? run `podsteer uninstall`)",
                               info->key_size, info->value_size, key_size, value_size),
                   pin);
  return fd;
}

Status erase_elem(int fd, const void* key, const std::string& pin) {
  if (bpf_map_delete_elem(fd, key) != 0 && errno != ENOENT) return sys_error("bpf_map_delete_elem", pin);
  return {};
}

}  // namespace podsteer
