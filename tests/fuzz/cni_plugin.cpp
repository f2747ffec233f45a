// What podsteer-cni reads from the runtime: CNI_ARGS (up to the first newline) and the
// network configuration on stdin (the rest).
#include <cstddef>
#include <cstdint>
#include <string>

#include "cni_plugin.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string in(reinterpret_cast<const char*>(data), size);
  auto nl = in.find('\n');
  std::string args = nl == std::string::npos ? in : in.substr(0, nl);
  std::string conf = nl == std::string::npos ? in : in.substr(nl + 1);
  std::map<std::string, std::string> kv;
  podsteer::cni::PluginError err;
  (void)podsteer::cni::parse_cni_args(args, kv, err);
  podsteer::cni::PluginConf pc;
  if (podsteer::cni::parse_plugin_conf(conf, pc, err)) (void)pc.prev_result.dump();
  return 0;
}
