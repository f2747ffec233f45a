#include "http_get.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <cerrno>
#include <cstring>
#include <memory>

namespace podsteer::cni {

namespace {

constexpr size_t kMaxAnswer = 8 << 20;  // no pod or namespace object comes near this

std::string tls_error(const std::string& what) {
  char buf[256] = "no detail";
  if (unsigned long e = ERR_get_error()) ERR_error_string_n(e, buf, sizeof(buf));
  return what + ": " + buf;
}

struct Url {
  bool tls = false;
  std::string host, port;
};

Result<Url> parse_server(const std::string& server) {
  Url u;
  std::string rest;
  if (server.rfind("https://", 0) == 0) {
    u.tls = true;
    rest = server.substr(8);
  } else if (server.rfind("http://", 0) == 0) {
    rest = server.substr(7);
  } else {
    return invalid("API server address is not http:// or https://", server);
  }
  if (auto slash = rest.find('/'); slash != std::string::npos) rest.resize(slash);
  if (!rest.empty() && rest[0] == '[') {
    auto close = rest.find(']');
    if (close == std::string::npos) return invalid("unterminated IPv6 address", server);
    u.host = rest.substr(1, close - 1);
    rest = rest.substr(close + 1);
    if (!rest.empty() && rest[0] == ':') u.port = rest.substr(1);
  } else if (auto colon = rest.rfind(':'); colon != std::string::npos) {
    u.host = rest.substr(0, colon);
    u.port = rest.substr(colon + 1);
  } else {
    u.host = rest;
  }
  if (u.port.empty()) u.port = u.tls ? "443" : "80";
  if (u.host.empty()) return invalid("API server address without a host", server);
  return u;
}

struct CloseFd {
  int fd = -1;
  ~CloseFd() {
    if (fd >= 0) close(fd);
  }
};

// A TCP connection to host:port made within the timeout; blocking afterwards, with the
// same timeout on every read and write.
Result<int> dial(const Url& u, int timeout_seconds) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_STREAM;
  if (int e = getaddrinfo(u.host.c_str(), u.port.c_str(), &hints, &res); e != 0)
    return invalid(std::string("resolve the API server: ") + gai_strerror(e), u.host);
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> list(res, freeaddrinfo);
  int last = EHOSTUNREACH;
  for (addrinfo* a = res; a; a = a->ai_next) {
    int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
    if (fd < 0) continue;
    int err = connect(fd, a->ai_addr, a->ai_addrlen) == 0 ? 0 : errno;
    if (err == EINPROGRESS) {
      pollfd p{fd, POLLOUT, 0};
      socklen_t len = sizeof(err);
      if (poll(&p, 1, timeout_seconds * 1000) != 1) err = ETIMEDOUT;
      else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    }
    if (err == 0) {
      fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
      timeval tv{timeout_seconds, 0};
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
      return fd;
    }
    last = err;
    close(fd);
  }
  return Error{"connect to the API server", last, u.host + ":" + u.port};
}

}  // namespace

Result<HttpAnswer> parse_http_answer(const std::string& raw) {
  HttpAnswer a;
  if (raw.rfind("HTTP/1.", 0) != 0 || raw.size() < 12) return invalid("not an HTTP answer from the API server");
  a.status = std::atoi(raw.c_str() + 9);
  auto end = raw.find("\r\n\r\n");
  if (end == std::string::npos) return invalid("HTTP answer without the end of its headers");
  std::string headers = raw.substr(0, end);
  for (auto& c : headers) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::string body = raw.substr(end + 4);
  if (headers.find("\r\ntransfer-encoding: chunked") == std::string::npos) {
    a.body = std::move(body);
    return a;
  }
  for (size_t pos = 0;;) {
    auto eol = body.find("\r\n", pos);
    if (eol == std::string::npos) return invalid("truncated chunked body");
    size_t n = std::strtoul(body.c_str() + pos, nullptr, 16);
    if (n == 0) return a;
    if (n > body.size() || eol + 2 + n > body.size()) return invalid("truncated chunked body");
    a.body.append(body, eol + 2, n);
    pos = eol + 2 + n + 2;
  }
}

Result<HttpAnswer> http_get(const std::string& server, const std::string& path, const std::string& bearer_token,
                            const std::string& ca_file, int timeout_seconds) {
  auto u = parse_server(server);
  if (!u) return u.error();
  auto fd = dial(*u, timeout_seconds);
  if (!fd) return fd.error();
  CloseFd conn{*fd};
  bool ip_literal = false;
  {
    in6_addr a6;
    in_addr a4;
    ip_literal = inet_pton(AF_INET, u->host.c_str(), &a4) == 1 || inet_pton(AF_INET6, u->host.c_str(), &a6) == 1;
  }
  std::string host_header = u->host.find(':') != std::string::npos ? "[" + u->host + "]" : u->host;
  std::string request = "GET " + path + " HTTP/1.0\r\nHost: " + host_header + ":" + u->port +
                        "\r\nAccept: application/json\r\nUser-Agent: podsteer-cni\r\nConnection: close\r\n";
  if (!bearer_token.empty()) request += "Authorization: Bearer " + bearer_token + "\r\n";
  request += "\r\n";

  std::unique_ptr<SSL_CTX, void (*)(SSL_CTX*)> ctx(nullptr, SSL_CTX_free);
  std::unique_ptr<SSL, void (*)(SSL*)> ssl(nullptr, SSL_free);
  if (u->tls) {
    ctx.reset(SSL_CTX_new(TLS_client_method()));
    if (!ctx) return invalid(tls_error("SSL_CTX_new"));
    SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    int loaded = ca_file.empty() ? SSL_CTX_set_default_verify_paths(ctx.get())
                                 : SSL_CTX_load_verify_locations(ctx.get(), ca_file.c_str(), nullptr);
    if (loaded != 1) return invalid(tls_error("load the cluster CA"), ca_file);
    ssl.reset(SSL_new(ctx.get()));
    if (!ssl || SSL_set_fd(ssl.get(), conn.fd) != 1) return invalid(tls_error("SSL_new"));
    X509_VERIFY_PARAM* param = SSL_get0_param(ssl.get());
    if (ip_literal) {
      if (X509_VERIFY_PARAM_set1_ip_asc(param, u->host.c_str()) != 1) return invalid(tls_error("verify by IP"), u->host);
    } else {
      SSL_set_tlsext_host_name(ssl.get(), u->host.c_str());
      if (SSL_set1_host(ssl.get(), u->host.c_str()) != 1) return invalid(tls_error("verify by name"), u->host);
    }
    if (SSL_connect(ssl.get()) != 1) {
      long v = SSL_get_verify_result(ssl.get());
      if (v != X509_V_OK) return invalid(std::string("the API server's certificate: ") + X509_verify_cert_error_string(v), server);
      return invalid(tls_error("TLS handshake with the API server"), server);
    }
  }
  auto send_all = [&](const std::string& data) -> bool {
    for (size_t off = 0; off < data.size();) {
      int n = ssl ? SSL_write(ssl.get(), data.data() + off, static_cast<int>(data.size() - off))
                  : static_cast<int>(write(conn.fd, data.data() + off, data.size() - off));
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  };
  if (!send_all(request)) return Error{"send the request to the API server", errno, server};
  std::string raw;
  char buf[16384];
  while (raw.size() < kMaxAnswer) {
    int n = ssl ? SSL_read(ssl.get(), buf, sizeof(buf)) : static_cast<int>(read(conn.fd, buf, sizeof(buf)));
    if (n > 0) {
      raw.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0 || (ssl && SSL_get_error(ssl.get(), n) == SSL_ERROR_ZERO_RETURN)) break;
    if (ssl && SSL_get_error(ssl.get(), n) == SSL_ERROR_SYSCALL && errno == 0) break;  // closed without close_notify
    return Error{"read the API server's answer", errno, server};
  }
  return parse_http_answer(raw);
}

}  // namespace podsteer::cni
