#include "log.h"

#include <bpf/libbpf.h>
#include <nlohmann/json.hpp>
#include <spdlog/pattern_formatter.h>
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

// %* in a pattern: the message as a JSON string (quoted and escaped; invalid UTF-8 replaced)
class JsonMessage : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&, spdlog::memory_buf_t& dest) override {
    std::string s = nlohmann::json(std::string(msg.payload.data(), msg.payload.size()))
                        .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    dest.append(s.data(), s.data() + s.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<JsonMessage>(); }
};

}  // namespace

void init_logging(bool verbose) {
  auto logger = spdlog::stderr_color_mt("podsteer");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("%^%l%$: %v");
  spdlog::set_level(verbose ? spdlog::level::trace : spdlog::level::info);
  libbpf_set_print(libbpf_to_spdlog);
}

std::optional<LogFormat> parse_log_format(const std::string& name) {
  if (name == "text") return LogFormat::Text;
  if (name == "json") return LogFormat::Json;
  return std::nullopt;
}

// The names the flags take (spdlog's own say "warning")
constexpr std::pair<const char*, spdlog::level::level_enum> kLevels[] = {
    {"trace", spdlog::level::trace}, {"debug", spdlog::level::debug}, {"info", spdlog::level::info},
    {"warn", spdlog::level::warn},   {"error", spdlog::level::err},   {"off", spdlog::level::off}};

std::optional<spdlog::level::level_enum> parse_log_level(const std::string& name) {
  if (name == "warning") return spdlog::level::warn;
  for (const auto& [n, l] : kLevels)
    if (name == n) return l;
  return std::nullopt;
}

void init_daemon_logging(spdlog::level::level_enum level, LogFormat format) {
  auto logger = spdlog::stderr_color_mt("podsteer");
  spdlog::set_default_logger(logger);
  auto f = std::make_unique<spdlog::pattern_formatter>(spdlog::pattern_time_type::utc);
  if (format == LogFormat::Json) {
    f->add_flag<JsonMessage>('*').set_pattern(R"({"time":"%Y-%m-%dT%H:%M:%S.%eZ","level":"%l","msg":%*})");
    logger->sinks()[0]->set_formatter(std::move(f));
    // a colour code would break a line a log pipeline parses
    if (auto* c = dynamic_cast<spdlog::sinks::stderr_color_sink_mt*>(logger->sinks()[0].get()))
      c->set_color_mode(spdlog::color_mode::never);
  } else {
    f->set_pattern("%Y-%m-%dT%H:%M:%S.%eZ %^%l%$ %v");
    logger->sinks()[0]->set_formatter(std::move(f));
  }
  spdlog::set_level(level);
  libbpf_set_print(libbpf_to_spdlog);
}

std::string log_level_name() {
  for (const auto& [n, l] : kLevels)
    if (spdlog::get_level() == l) return n;
  return std::string(spdlog::level::to_string_view(spdlog::get_level()).data());
}

void set_log_level(spdlog::level::level_enum level) { spdlog::set_level(level); }

}  // namespace podsteer
