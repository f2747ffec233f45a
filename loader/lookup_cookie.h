// The pod's netns cookie (and, in its TC program, the node's netns id), written into its
// instance of bpf/lookup.bpf.c before load: over the one ld_imm64 of
// PODSTEER_LOOKUP_COOKIE_MAGIC (PODSTEER_NODE_NSID_MAGIC). sk_lookup
// programs cannot read the netns cookie, and a .rodata value would cost a map per pod.
// Header-only: the loader, the BPF tests and the benchmark load the program this way.
#pragma once

#include <bpf/libbpf.h>
#include <linux/bpf.h>

#include <cerrno>
#include <cstdint>
#include <vector>

#include "podsteer_abi.h"

namespace podsteer {

// Writes value over the one ld_imm64 of magic in prog (before load). 0, -EINVAL unless
// exactly one placeholder was found, or libbpf's error.
inline int set_imm64(bpf_program* prog, uint64_t magic, uint64_t value) {
  const bpf_insn* in = bpf_program__insns(prog);
  std::vector<bpf_insn> insns(in, in + bpf_program__insn_cnt(prog));
  int found = 0;
  for (size_t i = 0; i + 1 < insns.size(); ++i) {
    bpf_insn& lo = insns[i];
    bpf_insn& hi = insns[i + 1];
    if (lo.code != (BPF_LD | BPF_IMM | BPF_DW) || lo.src_reg != 0 || uint32_t(lo.imm) != uint32_t(magic) ||
        uint32_t(hi.imm) != uint32_t(magic >> 32))
      continue;
    lo.imm = int32_t(uint32_t(value));
    hi.imm = int32_t(uint32_t(value >> 32));
    ++found;
    ++i;
  }
  if (found != 1) return -EINVAL;
  return bpf_program__set_insns(prog, insns.data(), insns.size());
}

inline int set_lookup_cookie(bpf_program* prog, uint64_t cookie) {
  return set_imm64(prog, PODSTEER_LOOKUP_COOKIE_MAGIC, cookie);
}

}  // namespace podsteer
