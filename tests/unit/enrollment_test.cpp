// Who is captured, as istio-cni decides it, and the plugin's config that carries the
// decision's settings to the node (podsteer-cni decides alone while the agent is away).
#include <gtest/gtest.h>

#include "cni_plugin.h"
#include "kube_policy.h"

using namespace podsteer;

namespace {

kube::Pod pod_in(const std::string& ns, kube::Labels labels = {}) {
  kube::Pod p;
  p.uid = "u";
  p.name = "web";
  p.namespace_ = ns;
  p.labels = std::move(labels);
  return p;
}

}  // namespace

TEST(Enrollment, AnExcludedNamespaceIsNeverCapturedWhateverItsLabels) {
  auto policy = kube::LabelPolicy::from("istio.io/dataplane-mode=ambient", "istio-system", {"kube-system", "infra"});
  kube::Labels ambient = {{"istio.io/dataplane-mode", "ambient"}};
  EXPECT_FALSE(policy.enrolled(pod_in("kube-system", ambient), &ambient));
  EXPECT_FALSE(policy.enrolled(pod_in("infra"), &ambient));
  EXPECT_TRUE(policy.enrolled(pod_in("shop", ambient), nullptr));
  EXPECT_TRUE(policy.enrolled(pod_in("shop"), &ambient));
  // without exclusions, the same pods are captured
  auto open = kube::LabelPolicy::from("istio.io/dataplane-mode=ambient", "istio-system");
  EXPECT_TRUE(open.enrolled(pod_in("kube-system", ambient), &ambient));
}

TEST(Enrollment, ThePluginReadsExcludedNamespacesAndRefusesAMalformedList) {
  cni::PluginConf c;
  cni::PluginError err;
  ASSERT_TRUE(cni::parse_plugin_conf(
      R"({"cniVersion":"1.0.0","name":"n","type":"podsteer-cni",
          "enrollment":{"label":"a=b","systemNamespace":"sys","excludeNamespaces":["kube-system","infra"]}})", c, err))
      << err.details;
  EXPECT_EQ(c.enroll_label, "a=b");
  EXPECT_EQ(c.system_namespace, "sys");
  EXPECT_EQ(c.exclude_namespaces, (std::vector<std::string>{"kube-system", "infra"}));
  for (const char* bad : {R"("kube-system")", R"([1])", R"({"a":1})"}) {
    cni::PluginConf d;
    cni::PluginError e;
    EXPECT_FALSE(cni::parse_plugin_conf(std::string(R"({"cniVersion":"1.0.0","name":"n","type":"podsteer-cni",
        "enrollment":{"excludeNamespaces":)") + bad + "}}",
                                        d, e))
        << bad;
    EXPECT_NE(e.details.find("enrollment.excludeNamespaces"), std::string::npos) << e.details;
  }
}
