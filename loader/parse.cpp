// Exclusion lists as users write them: ports and CIDRs separated by commas.
#include <arpa/inet.h>

#include <algorithm>
#include <cstring>

#include "datapath.h"

namespace podsteer {
namespace {

// Splits on commas, keeping empty items ("80," has two) so they can be rejected.
std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t comma = list.find(',', start);
    out.push_back(list.substr(start, comma - start));
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

}  // namespace

Result<std::vector<uint16_t>> parse_ports(const std::string& list) {
  std::vector<uint16_t> out;
  if (list.empty()) return out;
  for (const auto& item : split_list(list)) {
    if (item.empty() || item.size() > 5 || !std::all_of(item.begin(), item.end(), ::isdigit))
      return invalid(fmt::format("bad port '{}' in '{}': expected numbers 1-65535 separated by commas", item, list));
    unsigned long v = std::stoul(item);
    if (v == 0 || v > 65535)
      return invalid(fmt::format("port {} out of range 1-65535 in '{}'", item, list));
    out.push_back(static_cast<uint16_t>(v));
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

Result<Cidr> parse_cidr(const std::string& text) {
  Cidr c;
  c.text = text;
  auto slash = text.find('/');
  std::string addr = text.substr(0, slash);
  std::string len = slash == std::string::npos ? "" : text.substr(slash + 1);
  in_addr a4{};
  in6_addr a6{};
  unsigned max_len;
  if (inet_pton(AF_INET, addr.c_str(), &a4) == 1) {
    c.addr[10] = c.addr[11] = 0xff;
    std::memcpy(c.addr + 12, &a4, 4);
    max_len = 32;
  } else if (inet_pton(AF_INET6, addr.c_str(), &a6) == 1) {
    std::memcpy(c.addr, &a6, 16);
    max_len = 128;
  } else {
    return invalid(fmt::format("bad CIDR '{}': '{}' is not an IPv4 or IPv6 address", text, addr));
  }
  unsigned plen = max_len;
  if (slash != std::string::npos) {
    if (len.empty() || len.size() > 3 || !std::all_of(len.begin(), len.end(), ::isdigit) ||
        std::stoul(len) > max_len)
      return invalid(fmt::format("bad CIDR '{}': prefix length must be 0-{}", text, max_len));
    plen = std::stoul(len);
  }
  c.prefix = plen + (max_len == 32 ? 96 : 0);
  // clear host bits, so equal networks give equal keys
  for (unsigned bit = c.prefix; bit < 128; ++bit) c.addr[bit / 8] &= ~(0x80 >> (bit % 8));
  return c;
}

Result<std::vector<Cidr>> parse_cidrs(const std::string& list) {
  std::vector<Cidr> out;
  if (list.empty()) return out;
  for (const auto& item : split_list(list)) {
    auto c = parse_cidr(item);
    if (!c) return c.error();
    out.push_back(*c);
  }
  return out;
}

}  // namespace podsteer
