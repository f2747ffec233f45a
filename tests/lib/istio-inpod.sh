#!/usr/bin/env bash
# The reference: Istio's in-pod ambient redirection, as istio-cni installs it in a pod's
# netns (cni/pkg/iptables/iptables.go, AppendInpodRules + AddLoopbackRoutes +
# AddInpodMarkIPRule), for IPv4 and IPv6. Tests and benchmarks run the same case under these
# rules and under podsteer and compare what a user observes.
#
#   istio-inpod.sh apply NETNS [--dns] [--exclusions FILE]
#   istio-inpod.sh remove NETNS
#   istio-inpod.sh host NODE_NETNS POD_IP4 POD_IP6
#
# host: istio-cni's one rule in the node's netns (CreateHostRulesForHealthChecks): every
# TCP connection the node itself opens (-m owner --socket-exists) to an ambient pod is
# SNATed to 169.254.7.127, which the in-pod rules leave to the app; traffic forwarded
# through the node has no local socket and is not. (Istio matches the pods by an ipset;
# here the one pod's addresses.)
#
# --exclusions FILE (benchmarks only; Istio ambient has no such option): one IPv4 CIDR per
# line, each a RETURN before the outbound REDIRECT, the way iptables users exclude ranges.
set -euo pipefail

cmd=${1:?apply|remove}
netns=${2:?netns path}
shift 2
if [ "$cmd" = host ]; then
  pod4=${1:?pod IPv4}; pod6=${2:?pod IPv6}
  nsenter --net="$netns" iptables-restore -w --noflush <<EOF4
*nat
:ISTIO_POSTRT - [0:0]
-A POSTROUTING -j ISTIO_POSTRT
-A ISTIO_POSTRT -m owner --socket-exists -p tcp -d $pod4 -j SNAT --to-source 169.254.7.127
COMMIT
EOF4
  nsenter --net="$netns" ip6tables-restore -w --noflush <<EOF6
*nat
:ISTIO_POSTRT - [0:0]
-A POSTROUTING -j ISTIO_POSTRT
-A ISTIO_POSTRT -m owner --socket-exists -p tcp -d $pod6 -j SNAT --to-source fd16:9254:7127:1337:ffff:ffff:ffff:ffff
COMMIT
EOF6
  exit 0
fi
dns=0
exclusions=""
while (($#)); do
  case "$1" in
    --dns) dns=1 ;;
    --exclusions) exclusions=$2; shift ;;
    *) echo "istio-inpod.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
in_ns() { nsenter --net="$netns" "$@"; }

# $1: 4 or 6
rules() {
  local v=$1 lo probe
  if [ "$v" = 4 ]; then lo=127.0.0.1/32; probe=169.254.7.127; else lo=::1/128; probe=fd16:9254:7127:1337:ffff:ffff:ffff:ffff; fi
  echo "*mangle"
  echo ":ISTIO_PRERT - [0:0]"
  echo ":ISTIO_OUTPUT - [0:0]"
  echo "-A PREROUTING -j ISTIO_PRERT"
  echo "-A OUTPUT -j ISTIO_OUTPUT"
  echo "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"
  echo "-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff"
  echo "COMMIT"
  if [ "$dns" = 1 ]; then
    echo "*raw"
    echo ":ISTIO_PRERT - [0:0]"
    echo ":ISTIO_OUTPUT - [0:0]"
    echo "-A PREROUTING -j ISTIO_PRERT"
    echo "-A OUTPUT -j ISTIO_OUTPUT"
    echo "-A ISTIO_OUTPUT -p udp -m mark --mark 0x539/0xfff -m udp --dport 53 -j CT --zone 1"
    echo "-A ISTIO_PRERT -p udp -m mark ! --mark 0x539/0xfff -m udp --sport 53 -j CT --zone 1"
    echo "COMMIT"
  fi
  echo "*nat"
  echo ":ISTIO_PRERT - [0:0]"
  echo ":ISTIO_OUTPUT - [0:0]"
  echo "-A OUTPUT -j ISTIO_OUTPUT"
  echo "-A PREROUTING -j ISTIO_PRERT"
  echo "-A ISTIO_PRERT -s $probe -p tcp -m tcp -j ACCEPT"
  echo "-A ISTIO_PRERT ! -d $lo -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006"
  echo "-A ISTIO_OUTPUT -d $probe -p tcp -m tcp -j ACCEPT"
  if [ "$dns" = 1 ]; then
    echo "-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark 0x539/0xfff -m udp --dport 53 -j REDIRECT --to-ports 15053"
    echo "-A ISTIO_OUTPUT ! -d $lo -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15053"
  fi
  echo "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT"
  echo "-A ISTIO_OUTPUT ! -d $lo -o lo -j ACCEPT"
  if [ -n "$exclusions" ] && [ "$v" = 4 ]; then
    sed -e '/^[[:space:]]*$/d' -e 's|^\(.*\)$|-A ISTIO_OUTPUT -d \1 -j RETURN|' "$exclusions"
  fi
  echo "-A ISTIO_OUTPUT ! -d $lo -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"
  echo "COMMIT"
}

case "$cmd" in
  apply)
    rules 4 | in_ns iptables-restore --noflush
    rules 6 | in_ns ip6tables-restore --noflush
    in_ns ip route add local 0.0.0.0/0 dev lo table 100
    in_ns ip -6 route add local ::/0 dev lo table 100
    in_ns ip rule add fwmark 0x111/0xfff pref 32764 lookup 100
    in_ns ip -6 rule add fwmark 0x111/0xfff pref 32764 lookup 100
    ;;
  remove)
    # as the other modes found the netns: no tables (so no conntrack hooks), no conntrack
    # entries (their NAT bindings would clash with later connections), no rules
    for t in nat mangle raw; do
      in_ns nft delete table ip "$t" 2>/dev/null || true
      in_ns nft delete table ip6 "$t" 2>/dev/null || true
    done
    in_ns ip rule del fwmark 0x111/0xfff pref 32764 lookup 100 2>/dev/null || true
    in_ns ip -6 rule del fwmark 0x111/0xfff pref 32764 lookup 100 2>/dev/null || true
    in_ns ip route flush table 100 2>/dev/null || true
    in_ns ip -6 route flush table 100 2>/dev/null || true
    in_ns conntrack -F >/dev/null 2>&1 || true
    in_ns conntrack -f ipv6 -F >/dev/null 2>&1 || true
    ;;
  *) echo "istio-inpod.sh: $cmd: expected apply or remove" >&2; exit 2 ;;
esac
