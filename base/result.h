// One error convention for everything that touches the OS: an Error carries the failing
// operation, errno and context; Result<T> is a value or an Error. No exceptions cross
// module boundaries.
#pragma once

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace podsteer {

// What a caller may branch on. The message (op, context) is for people only: rewording it
// must never change what a program does.
enum class ErrorCode {
  kUnknown = 0,        // nothing to branch on: report it
  kInvalid,            // the caller's input is wrong (a flag, a request, a config file)
  kSystem,             // a system call failed: err holds its errno
  kNotFound,           // what was asked for is not there (an API object, a pin, a pod)
  kConflict,           // the state was made with other settings than asked for
  kIncompleteInstall,  // a state dir an interrupted install left behind
  kReplaced,           // the datapath was uninstalled or replaced by another process meanwhile
  kRefused,            // the peer answered no (the proxy's nack)
  kDenied,             // the API server does not accept who we are (HTTP 401) or what we ask (403)
};

struct Error {
  std::string op;       // the call or step that failed, e.g. "bpf_link_create"
  int err = 0;          // errno, 0 for a validation error
  std::string context;  // what it was applied to, in the user's words
  ErrorCode code = ErrorCode::kUnknown;

  bool is(ErrorCode c) const { return code == c; }
  // The same error, said of something more specific (the code and errno are kept).
  Error in(std::string where) const { return Error{op, err, std::move(where), code}; }

  std::string message() const {
    std::string m = context.empty() ? op : fmt::format("{}: {}", context, op);
    if (err != 0) m += fmt::format(": {} ({})", std::strerror(err), err);
    return m;
  }
};

// A validation failure: no errno, a message meant for the user.
inline Error invalid(std::string what, std::string context = {}, ErrorCode code = ErrorCode::kInvalid) {
  return Error{std::move(what), 0, std::move(context), code};
}

// Call right after the failing call, so errno is still the call's.
inline Error sys_error(std::string op, std::string context = {}) {
  int e = errno;
  return Error{std::move(op), e, std::move(context), ErrorCode::kSystem};
}

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Error e) : v_(std::move(e)) {}
  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }
  T& value() & { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  const T& value() const& { return std::get<0>(v_); }
  T* operator->() { return &std::get<0>(v_); }
  const T* operator->() const { return &std::get<0>(v_); }
  T& operator*() { return std::get<0>(v_); }
  const Error& error() const { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error e) : err_(std::move(e)), ok_(false) {}
  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const { return err_; }

 private:
  Error err_;
  bool ok_ = true;
};

using Status = Result<void>;

}  // namespace podsteer

// Propagate an error from an expression returning Status/Result.
#define PODSTEER_TRY(expr)                                  \
  do {                                                      \
    auto podsteer_try_r_ = (expr);                          \
    if (!podsteer_try_r_.ok()) return podsteer_try_r_.error(); \
  } while (0)
