#include "log.h"

#include <bpf/libbpf.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdarg>
#include <cstdio>
#include <string>

namespace podsteer {
namespace {

int libbpf_to_spdlog(enum libbpf_print_level level, const char* format, va_list args) {
  char buf[2048];
  int n = vsnprintf(buf, sizeof(buf), format, args);
  std::string msg(buf, n > 0 ? std::min<size_t>(n, sizeof(buf) - 1) : 0);
  while (!msg.empty() && msg.back() == '\n') msg.pop_back();
  if (level == LIBBPF_WARN)
    spdlog::debug("libbpf: {}", msg);  // failures are reported by our own errors
  else
    spdlog::trace("libbpf: {}", msg);
  return n;
}

}  // namespace

void init_logging(bool verbose) {
  auto logger = spdlog::stderr_color_mt("podsteer");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%^%l%$: %v");
  spdlog::set_level(verbose ? spdlog::level::trace : spdlog::level::info);
  libbpf_set_print(libbpf_to_spdlog);
}

}  // namespace podsteer
