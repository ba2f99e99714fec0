#!/bin/sh
# vpnlb `exec` check: a real OpenVPN tunnel to the gateway under test, and a ping through it to a
# host behind the gateway (the OpenVPN counterpart of ipsec-inside.sh).
#
#   [[backend.check]]
#   type = "exec"
#   command = ["/usr/local/lib/vpnlb/openvpn-inside.sh", "10.96.0.1", "/etc/vpnlb/openvpn-probe.ovpn"]
#   interval_ms = 15000
#   timeout_ms = 8000
#
# Arguments: the inside host to ping and a client profile for the probe (`client`, `dev tun`, its
# own certificate, tls-crypt key, ...) WITHOUT `remote` lines: the gateway under test is
# $VPNLB_BACKEND_ADDRESS, port $VPNLB_VIP_PORT or 1194, given here. The gateway must route the
# inside network for its clients (forwarding, NAT or a return route).
#
# Not run by vpnlb's test suite (its IPsec counterpart is); written from the same testbed's
# OpenVPN 2.6 setup (tests/src/openvpn.rs).
#
# openvpn runs in the foreground of this script's process group with its own tun device
# (vpnlbp<pid>), no pulled routes or DNS (route-nopull), and the ping is bound to that device, so
# probes of several gateways at once never share a route; the agent kills the group (SIGTERM, then
# SIGKILL) when the time is up.
set -eu
inside=${1:?usage: openvpn-inside.sh INSIDE_HOST PROFILE}
profile=${2:?usage: openvpn-inside.sh INSIDE_HOST PROFILE}
gw=${VPNLB_BACKEND_ADDRESS:?set by the vpnlb agent}
port=${VPNLB_VIP_PORT:-1194}
[ -n "$port" ] || port=1194
dev="vpnlbp$(( $$ % 100000 ))"
dir=$(mktemp -d "${TMPDIR:-/tmp}/vpnlb-ovpn-probe.XXXXXX")
openvpn --remote "$gw" "$port" --config "$profile" --nobind \
  --dev "$dev" --dev-type tun --route-nopull --pull-filter ignore redirect-gateway \
  --connect-retry-max 1 --connect-timeout 3 --writepid "$dir/pid" --log "$dir/log" --verb 3 \
  --daemon
trap 'st=$?; set +e; [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null; rm -rf "$dir"; exit $st' EXIT
trap 'exit 3' INT TERM
# Until the tunnel is up: "Initialization Sequence Completed" in the log (bounded by the agent).
limit=$(( (${VPNLB_TIMEOUT_MS:-8000} - 1500) / 100 ))
i=0
until grep -q "Initialization Sequence Completed" "$dir/log" 2>/dev/null; do
  i=$((i + 1))
  if [ $i -gt $limit ]; then
    echo "no OpenVPN tunnel with $gw:$port: $(grep -E 'TLS Error|AUTH_FAILED|error|refused' "$dir/log" | tail -n 1)"
    exit 1
  fi
  sleep 0.1
done
# The ping is bound to our device: no route is added (the kernel sends it on-link there).
if out=$(ping -n -c 1 -i 0.2 -w 1 -I "$dev" "$inside" 2>&1); then
  echo "tunnel to $gw up, $inside answers through it: $(echo "$out" | grep -o 'time=[^ ]*')"
  exit 0
fi
echo "tunnel to $gw up, but $inside does not answer through it: $(echo "$out" | grep -iE 'unreachable|packet loss' | head -n 1)"
exit 2
