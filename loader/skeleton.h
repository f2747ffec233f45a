// RAII ownership of a bpftool skeleton: open, set rodata, load as separate steps; not
// copyable. The skeleton is used only while installing: afterwards everything lives in
// pins and is opened by path.
#pragma once

#include <utility>

namespace podsteer {

template <typename Skel, Skel* (*Open)(), int (*Load)(Skel*), void (*Destroy)(Skel*)>
class Skeleton {
 public:
  Skeleton() : s_(Open()) {}
  Skeleton(const Skeleton&) = delete;
  Skeleton& operator=(const Skeleton&) = delete;
  ~Skeleton() {
    if (s_) Destroy(s_);
  }
  bool opened() const { return s_ != nullptr; }
  int load() { return Load(s_); }
  Skel* operator->() { return s_; }
  Skel* get() { return s_; }

 private:
  Skel* s_;
};

}  // namespace podsteer
