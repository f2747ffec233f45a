// The agent's pod table: found by every key a request may carry, and a pod replaced or
// removed leaves no stale index behind (a later pod reusing an address or a container id
// is found as itself).
#include <gtest/gtest.h>

#include "pod_table.h"

using podsteer::PodInfo;
using podsteer::PodTable;

namespace {

PodInfo pod(uint64_t cookie, const std::string& uid, const std::string& ctr, std::vector<std::string> ips) {
  PodInfo p;
  p.netns_cookie = cookie;
  p.uid = uid;
  p.container_id = ctr;
  p.namespace_ = "ns";
  p.name = "pod-" + uid;
  p.ips = std::move(ips);
  return p;
}

TEST(PodTable, FindsAPodByUidContainerIdCookieAndAddress) {
  PodTable t;
  t.put(pod(11, "u1", "c1", {"10.0.0.1", "fd00::1"}));
  t.put(pod(12, "u2", "c2", {"10.0.0.2"}));
  PodInfo by_uid;
  by_uid.uid = "u2";
  EXPECT_EQ(t.find(by_uid)->netns_cookie, 12u);
  PodInfo by_ctr;
  by_ctr.container_id = "c1";
  EXPECT_EQ(t.find(by_ctr)->netns_cookie, 11u);
  PodInfo by_cookie;
  by_cookie.netns_cookie = 12;
  EXPECT_EQ(t.find(by_cookie)->uid, "u2");
  EXPECT_EQ(t.by_address("fd00::1")->uid, "u1");
  EXPECT_FALSE(t.by_address("10.0.0.9"));
  PodInfo nobody;
  nobody.uid = "u9";
  EXPECT_FALSE(t.find(nobody));
  EXPECT_FALSE(t.find(PodInfo{})) << "an empty key names no pod";
  EXPECT_EQ(t.size(), 2u);
}

TEST(PodTable, AUidWinsOverAContainerIdThatNamesAnotherPod) {
  PodTable t;
  t.put(pod(11, "u1", "c1", {}));
  t.put(pod(12, "u2", "c2", {}));
  PodInfo key;
  key.uid = "u1";
  key.container_id = "c2";
  EXPECT_EQ(t.find(key)->netns_cookie, 11u);
}

TEST(PodTable, ReplacingOrErasingAPodDropsItsOldKeys) {
  PodTable t;
  t.put(pod(11, "u1", "c1", {"10.0.0.1"}));
  // the same netns captured again with a new sandbox and address
  t.put(pod(11, "u1", "c1b", {"10.0.0.5"}));
  PodInfo old_ctr;
  old_ctr.container_id = "c1";
  EXPECT_FALSE(t.find(old_ctr));
  EXPECT_FALSE(t.by_address("10.0.0.1"));
  EXPECT_EQ(t.by_address("10.0.0.5")->container_id, "c1b");
  // another pod takes the freed address; erasing the first must not take it away
  t.put(pod(12, "u2", "c2", {"10.0.0.1"}));
  auto gone = t.erase(11);
  ASSERT_TRUE(gone);
  EXPECT_EQ(gone->uid, "u1");
  EXPECT_FALSE(t.erase(11)) << "erasing twice is a no-op";
  EXPECT_EQ(t.by_address("10.0.0.1")->uid, "u2");
  PodInfo u1;
  u1.uid = "u1";
  EXPECT_FALSE(t.find(u1));
  EXPECT_EQ(t.all().size(), 1u);
}

}  // namespace
