// One HTTP GET from podsteer-cni to the API server, over TLS (OpenSSL, linked statically)
// or plain HTTP, for the rare ADD that finds the agent away.
//
// Why not a library: the plugin is copied onto the node and run there by the container
// runtime, outside any image, so it may need nothing the node's own system lacks. The
// maintained HTTP clients Debian has (libcurl, cpp-httplib) come only as shared libraries
// built against a dozen more (nghttp2, brotli, libidn2, ...); OpenSSL ships static
// archives. TLS, certificate and hostname checks are OpenSSL's; what is written here is
// HTTP/1.0 framing (the body ends when the server closes), with chunked bodies decoded in
// case a server uses them anyway.
#pragma once

#include <string>

#include "result.h"

namespace podsteer::cni {

struct HttpAnswer {
  int status = 0;
  std::string body;
};

// The status and body of an HTTP/1.x answer as it came off the wire: the body is what
// follows the headers, or its chunks joined when it is chunked (tests/fuzz/api_answer).
Result<HttpAnswer> parse_http_answer(const std::string& raw);

// server: http://HOST:PORT or https://HOST:PORT (HOST may be [IPv6]). https verifies the
// server against ca_file (the system's CAs when empty) and its name or IP address.
Result<HttpAnswer> http_get(const std::string& server, const std::string& path, const std::string& bearer_token,
                            const std::string& ca_file, int timeout_seconds);

}  // namespace podsteer::cni
