#pragma once

#include <optional>
#include <string>

#include <spdlog/spdlog.h>

namespace podsteer {

// One logger for the process; libbpf's own output goes through it at debug level, so it
// shows in full only with --verbose.

// The CLI's: "level: message" on stderr, for a person at a terminal.
void init_logging(bool verbose);

// The agent's: each line with its time (UTC, ISO 8601, milliseconds) and level, as text
// ("2026-12-06T23:52:59.123Z info repair: ...") or one JSON object per line
// ({"time":...,"level":...,"msg":...}) for a log pipeline.
enum class LogFormat { Text, Json };
std::optional<LogFormat> parse_log_format(const std::string& name);
// trace, debug, info, warn (warning), error, off
std::optional<spdlog::level::level_enum> parse_log_level(const std::string& name);
void init_daemon_logging(spdlog::level::level_enum level, LogFormat format);

// The level now, and a change of it while the process runs (the agent's POST /logging).
std::string log_level_name();
void set_log_level(spdlog::level::level_enum level);

}  // namespace podsteer
