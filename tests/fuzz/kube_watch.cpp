// A watch stream: cut into chunks at places the input chooses, split into lines (with a
// small line limit, so that oversized lines are exercised too), each line an event.
#include <cstddef>
#include <cstdint>
#include <string>

#include "kube_client.h"
#include "kube_source.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  size_t chunk = 1 + data[0] % 64;
  podsteer::kube::LineSplitter lines(512);
  size_t events = 0;
  auto on_line = [&](const std::string& line) {
    if (line.size() > 512) __builtin_trap();  // the limit holds
    auto e = podsteer::kube::parse_watch_event(line);
    if (!e) return true;
    events++;
    (void)podsteer::kube::parse_pod(e->object);
    (void)podsteer::kube::parse_namespace(e->object);
    return events < 1000;
  };
  for (size_t at = 1; at < size; at += chunk)
    if (!lines.feed(reinterpret_cast<const char*>(data) + at, std::min(chunk, size - at), on_line)) break;
  return 0;
}
