// The CNI config installer against the files a runtime reads: libcni's choice of the
// first file by name, .conf conversion, file modes, and a primary CNI rewriting its file
// while the agent chains into it.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "cni_config.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace podsteer;

namespace {

class CniConfig : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("podsteer-cniconf-" + std::to_string(getpid()) + "-" +
                                       ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir);
    fs::create_directories(dir);
    opts.conf_dir = dir.string();
    opts.bin_dir = "";
    opts.agent_socket = "/run/podsteer/cni.sock";
  }
  void TearDown() override { fs::remove_all(dir); }
  void write(const std::string& name, const json& j) { std::ofstream(dir / name) << j.dump(2); }
  json read(const std::string& name) {
    std::ifstream in(dir / name);
    std::stringstream ss;
    ss << in.rdbuf();
    return json::parse(ss.str(), nullptr, false);
  }
  std::vector<std::string> files() {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename());
    std::sort(out.begin(), out.end());
    return out;
  }
  fs::path dir;
  cni::InstallOptions opts;
};

TEST_F(CniConfig, ChainsIntoTheFirstFileByNameConvertingASinglePlugin) {
  write("10-calico.conflist", {{"cniVersion", "1.0.0"}, {"name", "k8s-pod-network"}, {"plugins", {{{"type", "calico"}}}}});
  write("05-flannel.json", {{"cniVersion", "0.4.0"}, {"name", "cbr0"}, {"type", "flannel"}, {"delegate", {{"isDefaultGateway", true}}}});
  chmod((dir / "05-flannel.json").c_str(), 0600);
  auto r = cni::ensure_chained(opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE(*r);
  EXPECT_EQ(files(), (std::vector<std::string>{"05-flannel.conflist", "10-calico.conflist"}))
      << "the single plugin file is replaced by a conflist, nothing else is left";
  auto list = read("05-flannel.conflist");
  EXPECT_EQ(list["cniVersion"], "0.4.0");
  EXPECT_EQ(list["name"], "cbr0");
  ASSERT_EQ(list["plugins"].size(), 2u);
  EXPECT_EQ(list["plugins"][0]["type"], "flannel");
  EXPECT_TRUE(list["plugins"][0]["delegate"]["isDefaultGateway"]) << "the primary plugin is kept whole";
  EXPECT_EQ(list["plugins"][1]["type"], "podsteer-cni");
  EXPECT_EQ(list["plugins"][1]["agentSocket"], "/run/podsteer/cni.sock");
  struct stat st {};
  ASSERT_EQ(stat((dir / "05-flannel.conflist").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "the file's mode is kept";
  EXPECT_EQ(read("10-calico.conflist")["plugins"].size(), 1u) << "not the first file: untouched";
  // again: nothing to do
  auto again = cni::ensure_chained(opts);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(*again);
  // .conf before .conflist of the same stem: libcni sorts "a.conf" first
  write("01-kindnet.conf", {{"cniVersion", "0.3.1"}, {"name", "kindnet"}, {"type", "ptp"}});
  ASSERT_TRUE(cni::ensure_chained(opts).ok());
  EXPECT_EQ(read("01-kindnet.conflist")["plugins"][1]["type"], "podsteer-cni");
  EXPECT_FALSE(fs::exists(dir / "01-kindnet.conf"));
  // uninstall takes us out of every list, keeping modes
  ASSERT_TRUE(cni::uninstall(opts).ok());
  EXPECT_EQ(read("05-flannel.conflist")["plugins"].size(), 1u);
  EXPECT_EQ(read("01-kindnet.conflist")["plugins"].size(), 1u);
  ASSERT_EQ(stat((dir / "05-flannel.conflist").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

// Found by the conflist fuzzer: an entry of ours that is not last (put there by hand, or by
// another tool's reordering) was updated in place, left before plugins that run after it,
// and a second pass changed the file again. Ours ends last and once, and then stays put.
TEST(ChainInto, OursEndsLastAndOnceWhereverItWas) {
  json ours = {{"type", "podsteer-cni"}, {"agentSocket", "/run/old.sock"}};
  json list = {{"cniVersion", "1.0.0"},
               {"name", "k8s"},
               {"plugins", {{{"type", "ptp"}}, ours, {{"type", "portmap"}}, ours}}};
  std::string out;
  auto r = cni::chain_into(list.dump(), "/run/podsteer/cni.sock", out);
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_TRUE(*r);
  auto j = json::parse(out);
  ASSERT_EQ(j["plugins"].size(), 3u) << out;
  EXPECT_EQ(j["plugins"][0]["type"], "ptp");
  EXPECT_EQ(j["plugins"][1]["type"], "portmap");
  EXPECT_EQ(j["plugins"][2], (json{{"type", "podsteer-cni"}, {"agentSocket", "/run/podsteer/cni.sock"}}));
  std::string again;
  auto r2 = cni::chain_into(out, "/run/podsteer/cni.sock", again);
  ASSERT_TRUE(r2);
  EXPECT_FALSE(*r2) << "a second pass changes nothing";
}

TEST_F(CniConfig, BadPrimaryConfigIsAnErrorAndChangesNothing) {
  std::ofstream(dir / "10-broken.conflist") << R"({"plugins": "not a list"})";
  auto r = cni::ensure_chained(opts);
  EXPECT_FALSE(r.ok());
  std::ifstream in(dir / "10-broken.conflist");
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), R"({"plugins": "not a list"})");
  fs::remove(dir / "10-broken.conflist");
  auto none = cni::ensure_chained(opts);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.error().message().find("no .conf"), std::string::npos) << none.error().message();
}

// The primary CNI rewrites its file in the moment between our read and our replace, once
// while we chain in and once while we take ourselves out: its version survives both.
TEST_F(CniConfig, RewriteBetweenOurReadAndOurReplaceIsKept) {
  auto primary = [](const std::string& v) {
    return json{{"cniVersion", "1.0.0"}, {"name", "net"}, {"plugins", {{{"type", "ptp"}, {"version", v}}}}};
  };
  write("10-net.conflist", primary("old"));
  int calls = 0;
  opts.before_replace = [&] {
    if (calls++ == 0) {
      std::ofstream(dir / ".primary.tmp") << primary("new").dump();
      fs::rename(dir / ".primary.tmp", dir / "10-net.conflist");
    }
  };
  auto r = cni::ensure_chained(opts);
  ASSERT_TRUE(r.ok()) << r.error().message();
  auto list = read("10-net.conflist");
  EXPECT_EQ(list["plugins"][0]["version"], "new") << list;
  EXPECT_EQ(list["plugins"].back()["type"], "podsteer-cni") << list;
  calls = 0;
  opts.before_replace = [&] {
    if (calls++ == 0) {
      auto j = primary("newer");
      j["plugins"].push_back({{"type", "podsteer-cni"}, {"agentSocket", "/run/podsteer/cni.sock"}});
      std::ofstream(dir / ".primary.tmp") << j.dump();
      fs::rename(dir / ".primary.tmp", dir / "10-net.conflist");
    }
  };
  ASSERT_TRUE(cni::uninstall(opts).ok());
  list = read("10-net.conflist");
  EXPECT_EQ(list["plugins"][0]["version"], "newer") << list;
  EXPECT_EQ(list["plugins"].size(), 1u) << list;
}

// The primary CNI rewrites its file (atomically, as CNI installers do) over and over while
// the agent chains into it: whatever the primary wrote last is what the file holds in the
// end, with our plugin appended.
TEST_F(CniConfig, NeverLosesAConcurrentRewriteOfThePrimary) {
  auto primary = [](int gen) {
    return json{{"cniVersion", "1.0.0"}, {"name", "net"}, {"plugins", {{{"type", "ptp"}, {"generation", gen}}}}};
  };
  write("10-net.conflist", primary(0));
  const int kWrites = 2000;
  std::atomic<bool> done{false};
  std::thread cni_installer([&] {
    for (int gen = 1; gen <= kWrites; ++gen) {
      std::ofstream(dir / ".primary.tmp") << primary(gen).dump();
      fs::rename(dir / ".primary.tmp", dir / "10-net.conflist");
    }
    done = true;
  });
  int rounds = 0;
  while (!done) {
    auto r = cni::ensure_chained(opts);
    EXPECT_TRUE(r.ok()) << r.error().message();
    rounds++;
  }
  cni_installer.join();
  ASSERT_TRUE(cni::ensure_chained(opts).ok());  // the agent's watch sees the last write
  auto list = read("10-net.conflist");
  ASSERT_FALSE(list.is_discarded());
  EXPECT_EQ(list["plugins"][0]["generation"], kWrites) << "the primary's last rewrite was lost (" << rounds << " rounds)";
  EXPECT_EQ(list["plugins"].back()["type"], "podsteer-cni");
  for (const auto& f : files()) EXPECT_EQ(f.find(".podsteer-"), std::string::npos) << "temporary file left: " << f;
}

}  // namespace
