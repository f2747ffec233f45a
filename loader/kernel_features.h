// Kernel feature probes: what podsteer needs, each with what is missing and why it
// matters. Used by `podsteer doctor` and before the first load.
#pragma once

#include <string>
#include <vector>

namespace podsteer {

struct FeatureCheck {
  std::string name;
  bool ok = false;
  bool required = true;  // optional ones have a fallback
  std::string detail;    // what was found, or what is missing
  std::string why;       // why it matters
};

// PODSTEER_PRETEND_MISSING=name,name makes the named probes report "missing": a test
// hook for the error paths on a kernel that has everything.
std::vector<FeatureCheck> probe_features(const std::string& state_dir);

// True if the named probe passes (honours PODSTEER_PRETEND_MISSING).
bool feature_ok(const std::string& name);

}  // namespace podsteer
