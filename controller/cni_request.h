// What podsteer-cni asks the agent, parsed from the one JSON line it sends. Every field is
// type-checked; bad input is an error, never an exception (tests/fuzz/cni_request).
#pragma once

#include <string>

#include "pod_source.h"
#include "result.h"

namespace podsteer {

struct CniRequest {
  std::string command;  // ADD, DEL or CHECK
  PodInfo pod;
};

Result<CniRequest> parse_cni_request(const std::string& line);

}  // namespace podsteer
