// Milliseconds, two clocks: steady for durations and deadlines, Unix for times shown to
// people (podsteer status).
#pragma once

#include <chrono>
#include <cstdint>

namespace podsteer {

inline int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline int64_t unix_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace podsteer
