#pragma once

#include <spdlog/spdlog.h>

namespace podsteer {

// One logger for the process; libbpf's own output goes through it at debug level, so it
// shows in full only with --verbose.
void init_logging(bool verbose);

}  // namespace podsteer
