#!/usr/bin/env bash
# The Helm chart as a user meets it, before the cluster e2e installs it on a real node:
#   helm lint --strict, with the defaults and with every optional part on;
#   helm template of those, each parsed; what each option changes is there;
#   the plain manifests (deploy/) are what the chart renders (scripts/render-manifests.sh --check);
#   the chart's version and appVersion are the project's;
#   values named as istio-cni's are there, under istio-cni's names.
set -uo pipefail
cd "$(dirname "$0")/../.."
HELM=${HELM:-$(tests/cluster/build-helm.sh)} || { echo "chart: building helm failed"; exit 1; }
export HELM
CHART=deploy/charts/podsteer
failures=0
pass() { echo "  ok    $1"; }
fail() { echo "  FAIL  $1"; failures=$((failures + 1)); }
check() { local what=$1; shift; if "$@" >/dev/null 2>&1; then pass "$what"; else fail "$what"; fi; }
not() { ! "$@"; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "chart: $("$HELM" version --short)"

all_on=(--set metrics.serviceMonitor.enabled=true --set metrics.tokenSecret=scrape-token --set proxy.enabled=true
  --set ambient.failOpen=true --set datapath.hookCgroup=/sys/fs/cgroup/kubepods --set 'extraArgs={--tc-mode,tcx}'
  --set 'excludeNamespaces={kube-system,infra}' --set global.logAsJson=true --set tag=9.9.9 --set proxy.tag=9.9.8)
check "helm lint --strict (defaults)" "$HELM" lint --strict "$CHART"
check "helm lint --strict (every optional part on)" "$HELM" lint --strict "$CHART" "${all_on[@]}"
"$HELM" template podsteer "$CHART" -n podsteer-system >"$out/default.yaml" 2>"$out/err" || { cat "$out/err"; fail "helm template (defaults)"; }
"$HELM" template podsteer "$CHART" -n podsteer-system "${all_on[@]}" >"$out/all.yaml" 2>"$out/err" ||
  { cat "$out/err"; fail "helm template (every optional part on)"; }
# each document as JSON, to ask questions of it
docs() { python3 -c 'import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))' "$1"; }
docs "$out/default.yaml" >"$out/default.json" && docs "$out/all.yaml" >"$out/all.json" || fail "the rendered YAML parses"
q() { jq -e "$2" "$out/$1.json"; }
kinds() { jq -r '[.[] | .kind] | sort | join(",")' "$out/$1.json"; }
check "defaults: the agent's objects and the uninstall hook, nothing else ($(kinds default))" \
  test "$(kinds default)" = "ClusterRole,ClusterRoleBinding,ConfigMap,DaemonSet,Job,Role,Role,RoleBinding,RoleBinding,ServiceAccount,ServiceAccount"
check "every optional part on: the proxy, the Service and the ServiceMonitor too" \
  test "$(kinds all)" = "ClusterRole,ClusterRoleBinding,ConfigMap,DaemonSet,DaemonSet,Job,Role,Role,RoleBinding,RoleBinding,Service,ServiceAccount,ServiceAccount,ServiceMonitor"
check "the uninstall Job, its account and its role are pre-delete hooks only, and may only get and delete the agent's DaemonSet" q default '
  [.[] | select(.metadata.name == "podsteer-uninstall") | .metadata.annotations["helm.sh/hook"]] == ["pre-delete", "pre-delete", "pre-delete", "pre-delete"] and
  ([.[] | select(.kind == "Role" and .metadata.name == "podsteer-uninstall") | .rules] ==
   [[{"apiGroups": ["apps"], "resources": ["daemonsets"], "resourceNames": ["podsteer-agent"], "verbs": ["get", "delete"]}]])'
check "the plain manifests carry no hook (the Job would delete the DaemonSet on apply)" not grep -q "helm.sh/hook" deploy/podsteer.yaml
agent='.[] | select(.kind == "DaemonSet" and .metadata.name == "podsteer-agent")'
cm='.[] | select(.kind == "ConfigMap") | .data'
check "everything in the release's namespace" q default '[.[] | select(.kind | test("^Cluster") | not) | .metadata.namespace] | unique == ["podsteer-system"]'
check "the image is the chart's appVersion" q default "$agent | .spec.template.spec.containers[0].image == \"podsteer.local/podsteer:$(sed -n 's/^appVersion: "\(.*\)"/\1/p' $CHART/Chart.yaml)\""
check "the tag value sets the agent's image, proxy.tag the proxy's" \
  q all '[.[] | select(.kind == "DaemonSet") | .spec.template.spec.containers[0].image] | sort == ["podsteer.local/podsteer:9.9.8", "podsteer.local/podsteer:9.9.9"]'
check "the agent is not privileged and drops every other capability" \
  q default "$agent | .spec.template.spec.containers[0].securityContext | .privileged == false and .capabilities.drop == [\"ALL\"]"
"$HELM" template x $CHART --set cniConfDir=/etc/cni/multus --set cniBinDir=/var/lib/cni/bin >"$out/dirs.yaml" &&
  docs "$out/dirs.yaml" >"$out/dirs.json"
check "cniConfDir and cniBinDir are the agent's settings, its hostPaths and its mount paths" q dirs "
  ($cm | .CNI_CONF_DIR == \"/etc/cni/multus\" and .CNI_BIN_DIR == \"/var/lib/cni/bin\") and
  ($agent | .spec.template.spec | ([.volumes[] | select(.name | startswith(\"cni-\")) | .hostPath.path] | sort) ==
     [\"/etc/cni/multus\", \"/var/lib/cni/bin\"] and
   ([.containers[0].volumeMounts[] | select(.name | startswith(\"cni-\")) | .mountPath] | sort) ==
     [\"/etc/cni/multus\", \"/var/lib/cni/bin\"])"
check "metrics on by default: scrape annotations, the port, METRICS_PORT" q default \
  "($agent | .spec.template.metadata.annotations[\"prometheus.io/scrape\"] == \"true\" and .spec.template.metadata.annotations[\"prometheus.io/port\"] == \"15014\") and ($cm | .METRICS_PORT == \"15014\")"
check "metrics off: no annotations, METRICS_PORT empty (loopback only)" bash -c "
  '$HELM' template x $CHART --set metrics.enabled=false | grep -q 'METRICS_PORT: \"\"' &&
  ! '$HELM' template x $CHART --set metrics.enabled=false | grep -q prometheus.io/scrape"
check "a token Secret is mounted and passed, and the ServiceMonitor sends it" q all \
  "($agent | .spec.template.spec.containers[0].args[0] | contains(\"--metrics-token-file /etc/podsteer/metrics/token\")) and
   ([.[] | select(.kind == \"ServiceMonitor\") | .spec.endpoints[0].authorization.credentials.name] == [\"scrape-token\"])"
check "excludeNamespaces, failOpen, hookCgroup, extraArgs, logAsJson reach the agent's settings" q all \
  "$cm | .EXCLUDE_NAMESPACES == \"kube-system,infra\" and .EXTRA_FLAGS == \"--fail-open --hook-cgroup /sys/fs/cgroup/kubepods --tc-mode tcx\" and .PODSTEER_LOG_FORMAT == \"json\""
check "a changed setting changes the pod template (checksum/config), so the agents roll" bash -c "
  a=\$('$HELM' template x $CHART | grep checksum/config); b=\$('$HELM' template x $CHART --set logging.level=debug | grep checksum/config)
  [ -n \"\$a\" ] && [ \"\$a\" != \"\$b\" ]"
check "a new agent tag leaves the proxy's pod template as it was" bash -c "
  p() { '$HELM' template x $CHART --set proxy.enabled=true --set proxy.tag=1 --set tag=\$1 --show-only templates/proxy-daemonset.yaml | sed -n '/template:/,\$p'; }
  [ \"\$(p 2)\" = \"\$(p 3)\" ]"
for v in hub tag pullPolicy cniConfDir cniBinDir excludeNamespaces ambient.dnsCapture logging.level global.logAsJson \
  global.istioNamespace resources podAnnotations podLabels rollingMaxUnavailable nodeSelector tolerations priorityClassName; do
  check "values.yaml has $v (istio-cni's name, or Kubernetes')" \
    python3 -c "import yaml,sys; d=yaml.safe_load(open('$CHART/values.yaml'))
for k in '$v'.split('.'): d=d[k]"
done
VERSION=$(sed -nE 's/^project\(podsteer VERSION ([0-9.]+).*/\1/p' CMakeLists.txt)
check "Chart.yaml's version and appVersion are the project's ($VERSION)" \
  grep -qx "version: $VERSION" $CHART/Chart.yaml -a -n "$(grep -x "appVersion: \"$VERSION\"" $CHART/Chart.yaml)"
check "deploy/kustomization.yaml's image tag is the project's version" grep -q "newTag: \"$VERSION\"" deploy/kustomization.yaml
if scripts/render-manifests.sh --check >"$out/render" 2>&1; then pass "the plain manifests in deploy/ are what the chart renders"
else cat "$out/render"; fail "the plain manifests in deploy/ are what the chart renders"; fi
echo "chart: $failures failure(s)"
[ "$failures" = 0 ]
