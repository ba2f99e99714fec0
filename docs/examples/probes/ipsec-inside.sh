#!/bin/sh
# vpnlb `exec` check: a real IKEv2 tunnel to the gateway under test, and a ping through it to a
# host behind the gateway. Up (exit 0) only if the gateway's IKE daemon, its ESP processing and
# its path to the inside network all work, as for a real user.
#
#   [[backend.check]]
#   type = "exec"
#   command = ["/usr/local/lib/vpnlb/ipsec-inside.sh", "10.96.0.1", "/etc/vpnlb/ipsec-probe.psk"]
#   interval_ms = 10000
#   timeout_ms = 5000
#
# Arguments: the inside host to ping, a file holding the pre-shared key, and optionally the IKE
# identity of the probe (default vpnlb-probe@$(hostname)). The gateway under test is
# $VPNLB_BACKEND_ADDRESS (set by the agent); it needs a connection for the probe that accepts
# IKE on its own address, assigns a virtual IP from a pool and routes the pool into the tunnel
# (docs/gateways.md, "End-to-end probes").
#
# How it stays out of the load balancer's way: it runs its own charon (strongSwan's IKE daemon)
# in a private mount namespace (charon's pid file is at a fixed path), with its state in a
# temporary directory. With kernel-libipsec (ESP in userspace, for hosts without kernel ESP) it
# puts the virtual IP on a tun device of its own and routes the gateway's traffic selectors to it
# in a routing table of this run's own (so two probes of two gateways at once never share a route),
# and the ping is bound to that device. The agent kills the whole process group when the time is
# up. On a host with kernel ESP (XFRM), drop
# kernel-libipsec from the plugin list and bind the ping to the virtual IP instead (`-I $vip`).
set -eu
inside=${1:?usage: ipsec-inside.sh INSIDE_HOST PSK_FILE [IDENTITY]}
psk_file=${2:?usage: ipsec-inside.sh INSIDE_HOST PSK_FILE [IDENTITY]}
id=${3:-vpnlb-probe@$(hostname)}
gw=${VPNLB_BACKEND_ADDRESS:?set by the vpnlb agent}
psk=$(cat "$psk_file")
dir=$(mktemp -d "${TMPDIR:-/tmp}/vpnlb-ipsec-probe.XXXXXX")
trap 'st=$?; set +e; rm -rf "$dir"; exit $st' EXIT
trap 'exit 3' INT TERM
mkdir "$dir/run"
# This run's routing table and rule priority (below main's 32766).
table=$((20000 + $$ % 10000))

cat > "$dir/strongswan.conf" <<CONF
charon {
  load = random nonce openssl kdf sha1 sha2 aes gcm pem pkcs1 x509 pubkey revocation constraints curve25519 hmac kernel-libipsec kernel-netlink socket-default vici
  routing_table = $table
  routing_table_prio = $table
  port = 0
  port_nat_t = 0
  retransmit_timeout = 0.5
  retransmit_tries = 2
  filelog {
    probe {
      path = $dir/charon.log
      default = 1
    }
  }
  plugins {
    vici {
      socket = unix://$dir/charon.vici
    }
  }
}
CONF

cat > "$dir/swanctl.conf" <<CONF
connections {
  probe {
    version = 2
    remote_addrs = $gw
    vips = 0.0.0.0, ::
    proposals = aes256-sha256-x25519, aes128gcm16-prfsha256-ecp256, default
    local {
      auth = psk
      id = $id
    }
    remote {
      auth = psk
    }
    children {
      inside {
        # What the gateway offers (narrowed to its local_ts), which must include $inside.
        remote_ts = 0.0.0.0/0, ::/0
        esp_proposals = aes256gcm16, aes128gcm16, default
      }
    }
  }
}
secrets {
  ike-probe {
    secret = "$psk"
  }
}
CONF

uri="unix://$dir/charon.vici"
# charon, in its own mount namespace with $dir/run as /run; stopped by the trap or the agent.
unshare -m --propagation private sh -c \
  "mount --bind '$dir/run' /run && STRONGSWAN_CONF='$dir/strongswan.conf' exec /usr/lib/ipsec/charon" \
  >/dev/null 2>&1 &
charon=$!
# On the way out (also when the agent's time is up: it sends SIGTERM first), charon removes its
# routing rule itself; the `ip rule del` is for a charon that could not.
trap 'st=$?; set +e; kill $charon 2>/dev/null; wait $charon 2>/dev/null; ip rule del table $table 2>/dev/null; rm -rf "$dir"; exit $st' EXIT
trap 'exit 3' INT TERM
i=0
until [ -S "$dir/charon.vici" ]; do
  i=$((i + 1)); [ $i -le 100 ] || { echo "charon did not start"; exit 1; }
  sleep 0.02
done
swanctl --load-all --file "$dir/swanctl.conf" --uri "$uri" >/dev/null
# IKE_SA_INIT, IKE_AUTH and the CHILD_SA within the agent's limit (less a second for the ping).
limit=$(( (${VPNLB_TIMEOUT_MS:-5000} - 1000) / 1000 )); [ "$limit" -ge 1 ] || limit=1
if ! swanctl --initiate --child inside --timeout "$limit" --uri "$uri" >"$dir/initiate.log" 2>&1; then
  echo "no IKE/CHILD SA with $gw: $(grep -E 'failed|error|received' "$dir/initiate.log" | tail -n 1)"
  exit 1
fi
# charon's own tun device (its fd's info names it; another probe's charon has another one) and
# the virtual IP the gateway assigned, which charon put on it.
dev=$(cat /proc/$charon/fdinfo/* 2>/dev/null | awk '$1 == "iff:" {print $2; exit}')
vip=$(ip -o addr show dev "${dev:-none}" 2>/dev/null | awk '$3 == "inet" || $3 == "inet6" {split($4, p, "/"); if (p[1] !~ /^fe80/) {print p[1]; exit}}')
[ -n "$dev" ] && [ -n "$vip" ] || { echo "tunnel up to $gw, but no virtual IP on charon's tun device (${dev:-none})"; exit 1; }
# Echoes every 0.2 s for at most a second, until one is answered (UDP may lose one).
if out=$(ping -n -c 1 -i 0.2 -w 1 -I "$dev" "$inside" 2>&1); then
  echo "tunnel to $gw up, $inside answers through it from $vip: $(echo "$out" | grep -o 'time=[^ ]*')"
  exit 0
fi
echo "tunnel to $gw up (virtual IP $vip), but $inside does not answer through it: $(echo "$out" | grep -iE 'unreachable|prohibited|packet loss' | head -n 1)"
exit 2
