#!/usr/bin/env bash
# The meshbpf demo: two throwaway pods and a server, one pod registered in the
# mesh, real connections from both, and what meshbpf did with each.
# Run as root on Debian 12; it installs what it needs, builds, and removes
# everything it created when it ends, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
meshbpf_require_root

if [ -t 1 ]; then B=$'\e[1m'; G=$'\e[32m'; Y=$'\e[33m'; C=$'\e[36m'; D=$'\e[2m'; R=$'\e[0m'; else B= G= Y= C= D= R=; fi
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$R"; }
info() { printf '    %s\n' "$*"; }

step "Installing build dependencies (if missing)"
meshbpf_install_deps
if [ -n "${MESHBPF_DEMO_BIN:-}" ]; then
    # Binaries built already (the end-to-end test of this demo passes its own).
    BIN=$MESHBPF_DEMO_BIN
else
    step "Building meshbpf, the sidecar stand-in and the demo workloads (release)"
    cargo build --release --bins --examples 2>&1 | sed -u 's/^/    /'
    BIN=$PWD/target/release
fi
EX=$BIN/examples

WORK=/run/meshbpf-demo
PIN=$WORK/bpf/mesh
PIDS=()
cleanup() {
    set +e
    # Run once, and to the end: a second Ctrl-C must not leave half the cleanup undone.
    trap - EXIT
    trap '' INT TERM
    printf '\n%s==> Cleaning up%s\n' "$B" "$R"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    [ -n "${CG:-}" ] && for cg in "$CG"/*/; do echo 1 > "$cg/cgroup.kill" 2>/dev/null; done
    sleep 0.2
    [ -x "$BIN/meshbpf" ] && "$BIN/meshbpf" detach --pin-dir "$PIN" >/dev/null 2>&1
    [ -n "${CG:-}" ] && { for cg in "$CG"/*/; do rmdir "$cg" 2>/dev/null; done; rmdir "$CG" 2>/dev/null; }
    for ns in mbdemo-app mbdemo-plain mbdemo-web mbdemo-dns mbdemo-br; do ip netns del "$ns" 2>/dev/null; done
    mountpoint -q "$WORK/bpf" && umount "$WORK/bpf"
    mountpoint -q "$WORK/cgroup2" && umount "$WORK/cgroup2"
    rm -rf "$WORK"
    info "removed the pods, cgroups, pins and mounts the demo made"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "Setting up: bpffs, a cgroup v2, four pods on a bridge"
mkdir -p "$WORK/bpf" "$WORK/cgroup2" "$WORK/bin"
# The pods' processes run as uids 1000 and 1337: give them copies they can reach even when
# this checkout sits below a directory only root may enter (such as /root).
install -m 755 "$BIN/meshbpf" "$EX/sidecar" "$BIN/netprobe" "$WORK/bin/"
BIN=$WORK/bin EX=$WORK/bin
mount -t bpf bpf "$WORK/bpf"
# Our own cgroup2 mount: the same hierarchy as any other, whether or not one is mounted.
mount -t cgroup2 none "$WORK/cgroup2"
CG=$WORK/cgroup2/meshbpf-demo
mkdir -p "$CG"
ip netns add mbdemo-br
ip -n mbdemo-br link add br0 type bridge && ip -n mbdemo-br link set br0 up
n=10
for pod in app plain web dns; do
    ns=mbdemo-$pod
    ip netns add "$ns"
    ip link add eth0 netns "$ns" type veth peer name "p$n" netns mbdemo-br
    ip -n mbdemo-br link set "p$n" master br0 up
    ip -n "$ns" addr add "192.0.2.$n/24" dev eth0
    ip -n "$ns" addr add "2001:db8::$n/64" dev eth0 nodad
    ip -n "$ns" link set eth0 up && ip -n "$ns" link set lo up
    mkdir -p "$CG/$pod"
    info "pod ${C}$pod${R}: netns $ns, 192.0.2.$n and 2001:db8::$n, cgroup $CG/$pod"
    n=$((n + 1))
done
WEB4=192.0.2.12 WEB6=2001:db8::12 DNS4=192.0.2.13

# in_pod POD UID CMD...: run CMD in the pod's cgroup and netns as UID.
in_pod() {
    local pod=$1 uid=$2; shift 2
    sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG/$pod" \
        ip netns exec "mbdemo-$pod" setpriv --reuid "$uid" --regid "$uid" --clear-groups "$@"
}

step "meshbpf attach --cgroup $CG"
"$BIN/meshbpf" attach --cgroup "$CG" --pin-dir "$PIN" | sed 's/^/    /'
# The bind model inbound (the article's): the stand-in owns pod_ip:80 and forwards to the
# application's moved bind. (Istio's model, --inbound-mode redirect, wants its 15006 listener.)
step "meshbpf register --netns /run/netns/mbdemo-app --inbound-mode bind   (the 'plain' pod stays out of the mesh)"
"$BIN/meshbpf" register --netns /run/netns/mbdemo-app --inbound-mode bind --pin-dir "$PIN" | sed 's/^/    /'

# Every decision the programs take in app, live, until the demo stops it (Ctrl-C's SIGINT).
"$BIN/meshbpf" trace --netns /run/netns/mbdemo-app --pin-dir "$PIN" >"$WORK/trace.log" 2>"$WORK/trace.err" &
TRACE=$!
PIDS+=($TRACE)

in_pod web 1000 "$BIN/netprobe" http 0.0.0.0:8080 "[::]:8081" >"$WORK/web.log" 2>&1 &
PIDS+=($!)
in_pod dns 0 dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
    --user=root --pid-file --log-facility=- --listen-address=$DNS4 --host-record=web.mesh.test,$WEB4,$WEB6 \
    >"$WORK/dns.log" 2>&1 &
PIDS+=($!)
# The registered pod's own service: it asks for 0.0.0.0:80 (as root, like many images).
in_pod app 0 "$BIN/netprobe" http 0.0.0.0:80 >"$WORK/app.log" 2>&1 &
PIDS+=($!)
wait_for() { for _ in $(seq 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "timed out waiting for $2 in $1" >&2; return 1; }
wait_for "$WORK/app.log" listening=
in_pod app 1337 "$EX/sidecar" --pod-ip 192.0.2.10 --pod-ip 2001:db8::10 --inbound 80 >"$WORK/sidecar-app.log" 2>&1 &
PIDS+=($!)
in_pod plain 1337 "$EX/sidecar" >"$WORK/sidecar-plain.log" 2>&1 &
PIDS+=($!)
wait_for "$WORK/trace.err" 'reading slot' && wait_for "$WORK/sidecar-app.log" 'dns-udp=\[::1' && wait_for "$WORK/sidecar-plain.log" 'dns-udp=\[::1' && wait_for "$WORK/web.log" 8081 && wait_for "$WORK/dns.log" started
info "HTTP server in pod web on :8080 (IPv4) and :8081 (IPv6); sidecar stand-in (uid 1337) on :15001 in app and plain"
info "app's own service asked for 0.0.0.0:80 and got ${G}$(sed -n 's/^listening=//p' "$WORK/app.log")${R}; app's sidecar (not root) listens on 192.0.2.10:80 and [2001:db8::10]:80"

# curl prints IPv6 addresses bare: 2001:db8::1:80 -> [2001:db8::1]:80
bracket() { case $1 in *:*:*) echo "[${1%:*}]:${1##*:}" ;; *) echo "$1" ;; esac; }

# request POD URL: a real HTTP GET with curl, which also reports its socket's two ends
# (the remote one through getpeername(), which meshbpf keeps pointing at the server).
request() {
    local pod=$1 url=$2 out local peer reply dest
    dest=${url#http://}; dest=${dest%%/*}
    out=$(in_pod "$pod" 1000 curl -sS --max-time 5 -w 'local=%{local_ip}:%{local_port}\npeer=%{remote_ip}:%{remote_port}\n' "$url" 2>&1) || { info "$out"; return 1; }
    local=$(sed -n 's/^local=//p' <<<"$out"); peer=$(sed -n 's/^peer=//p' <<<"$out"); reply=$(grep '^served by' <<<"$out")
    local=$(bracket "$local"); peer=$(bracket "$peer")
    # Behind meshbpf, as behind iptables, getsockname() names the pod's address: whether the
    # connection went to the sidecar shows in the sidecar's log, by the socket's port.
    local seen
    seen=$(grep -m1 "^outbound peer=[^ ]*:${local##*:} " "$WORK/sidecar-$pod.log" | sed 's/^outbound peer=\([^ ]*\) .*/\1/' || true)
    if [ -n "$seen" ]; then
        printf '    %s%-5s%s -> %-22s %sCAPTURED%s  socket really goes %s -> sidecar; getsockname() says %s and getpeername() %s, as behind iptables\n' "$C" "$pod" "$R" "$dest" "$G" "$R" "$seen" "$local" "$peer"
    else
        printf '    %s%-5s%s -> %-22s %sdirect%s    from %s, untouched\n' "$C" "$pod" "$R" "$dest" "$Y" "$R" "$local"
    fi
    printf '    %s      HTTP 200: %s%s\n' "$D" "$reply" "$R"
}

step "HTTP from the registered pod (app) and the unregistered one (plain)"
for pod in app plain; do
    request "$pod" "http://$WEB4:8080/"
    request "$pod" "http://[$WEB6]:8081/"
done

step "Inbound: plain calls app's own service at http://192.0.2.10/"
request plain "http://192.0.2.10/"
grep '^inbound' "$WORK/sidecar-app.log" | sed 's/^/    sidecar: /'

step "DNS: dig @$DNS4 web.mesh.test, from app (registered) and plain"
for pod in app plain; do
    out=$(in_pod "$pod" 1000 dig +time=3 +tries=1 @"$DNS4" web.mesh.test A)
    answer=$(awk '/^web.mesh.test/ {print $NF}' <<<"$out"); server=$(sed -n 's/^;; SERVER: //p' <<<"$out")
    via=$(grep -c '^dns ' "$WORK/sidecar-$pod.log" || true)
    if [ "$via" -gt 0 ]; then how="${G}through the sidecar${R}"; else how="${Y}straight to the server${R}"; fi
    printf '    %s%-5s%s answer %s from SERVER %s, %s\n' "$C" "$pod" "$R" "$answer" "$server" "$how"
done

step "meshbpf trace --netns /run/netns/mbdemo-app: why each decision in app was taken"
kill -INT "$TRACE" && wait "$TRACE" 2>/dev/null
# Time, pod, caller, protocol, hook, destination -> where it went, and why.
grep -E ' (connect|sendto|bind|getsockopt) ' "$WORK/trace.log" | head -n 10 | cut -d' ' -f2- | sed 's/^/    /'
printf '    (%s decisions in all)\n' "$(wc -l <"$WORK/trace.log")"

step "meshbpf explain: the same policy, asked in advance, with the rule that decides"
for q in "--dst $WEB4:8080" "--dst $WEB4:8080 --uid 1337" "--dst 127.0.0.1:9000" "--dst $DNS4:53 --proto udp"; do
    # shellcheck disable=SC2086 # the query's words
    printf '    %-36s %s\n' "$q" "$("$BIN/meshbpf" explain --netns /run/netns/mbdemo-app $q --pin-dir "$PIN")"
done

step "What the sidecar in app learned through getsockopt(SO_ORIGINAL_DST)"
grep -E '^(outbound|dns)' "$WORK/sidecar-app.log" | sed 's/^/    /'
printf '    (the sidecar in plain saw %s connections)\n' "$(grep -c '^outbound' "$WORK/sidecar-plain.log" || true)"

step "meshbpf list: registered pods and the inbound listeners discovered in them"
"$BIN/meshbpf" list --pin-dir "$PIN" | sed 's/^/    /'

step "meshbpf status"
"$BIN/meshbpf" status --pin-dir "$PIN" | sed 's/^/    /'
