#!/bin/bash
# Runs inside the VM that vm/run.sh boots when the guest kernel is below meshbpf's floor
# (5.15; vm/run.sh 5.10 boots bullseye's 5.10), in place of the test binaries: meshbpf must
# refuse there, clearly and without leaving anything behind. Each check below prints one
# "ok"/"FAILED" line to the summary (as a test binary does); the run fails if any fails.
#   check   `meshbpf check` exits 5 (the kernel) and marks each missing feature NO with the
#           kernel that adds it
#   attach  `meshbpf attach` to a cgroup2 directory made here (never a hierarchy's root)
#           exits 5 naming each missing feature with its kernel, and leaves no pin, no
#           program loaded and nothing attached to the cgroup
#   agent   `meshbpf agent` (temporary CNI dirs) answers /healthz 503 naming each missing
#           feature, installs no plugin, leaves the primary conflist as it was, attaches
#           nothing, and exits 5 when stopped
# Usage: floor.sh MESHBPF_BINARY OUTPUT_DIR
set -u
meshbpf=$1
out=$2
kver=$(uname -r)
log=$out/floor.log
: > "$log"

# What 5.10 lacks of what meshbpf needs, and the kernel that adds each: the names are
# `meshbpf check`'s (src/probe.rs). Another kernel below the floor may lack more; these
# must be named on any kernel older than 5.12.
expected=(
    "netns cookie in sockops|5.15"
    "netns cookie in sk_msg|5.15"
    "bind skipping CAP_NET_BIND_SERVICE (return 3)|5.12"
    "SO_NETNS_COOKIE|5.14"
    "netns cookie in getsockopt hooks|5.15"
)

failures=0
result() { # NAME SECONDS [WHY...]: one summary line
    local name=$1 secs=$2; shift 2
    if [ $# -eq 0 ]; then
        echo "ok      floor-$name (${secs}s): refused on Linux $kver as expected" >> "$out/summary.txt"
    else
        failures=$((failures + 1))
        (IFS=";"; echo "FAILED  floor-$name (${secs}s): $*") >> "$out/summary.txt"
        { echo "== floor-$name FAILED:"; printf '   %s\n' "$@"; } >> "$log"
    fi
}
# Adds each line of what the command given prints to `why` (no process substitution: the
# guest has no /dev/fd, which only a booted system's udev makes).
why_from() {
    local line
    "$@" > "$work/why.tmp"
    while IFS= read -r line; do why+=("$line"); done < "$work/why.tmp"
}
# Names each expected feature missing in FILE (as "NAME ... Linux VERSION" with the table's
# or the error's wording); prints what it does not find.
unnamed() { # FILE STYLE(table|error)
    local file=$1 style=$2 entry name min
    for entry in "${expected[@]}"; do
        name=${entry%|*} min=${entry#*|}
        case $style in
            table) grep -qF "$name" "$file" && grep -F "$name" "$file" | grep -qE " $min +NO " ||
                echo "the table does not mark '$name' (Linux $min) NO" ;;
            error) grep -qF "$name (Linux $min" "$file" ||
                echo "the error does not name '$name (Linux $min'" ;;
        esac
    done
}
# Everything this script makes, removed however it ends.
work=$(mktemp -d /tmp/meshbpf-floor.XXXXXX)
agent_pid=
cleanup() {
    [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null
    umount "$work/bpf" "$work/cgroup" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{cgroup,bpf,cni/bin,cni/net.d}
mount -t cgroup2 none "$work/cgroup" && mkdir "$work/cgroup/pods"
mount -t bpf bpf "$work/bpf"
pins=$work/bpf/meshbpf
cgroup=$work/cgroup/pods
# What an attach might leave: pins, meshbpf's programs loaded, programs on the cgroup.
leftovers() {
    local found
    found=$(find "$work/bpf" -mindepth 1 2>/dev/null | head -5)
    [ -n "$found" ] && echo "pins left: $found"
    found=$(bpftool prog show 2>/dev/null | grep -cE ' name handle__')
    [ "$found" != 0 ] && echo "$found meshbpf programs still loaded"
    found=$(bpftool cgroup show "$cgroup" 2>/dev/null | tail -n +2)
    [ -n "$found" ] && echo "attached to $cgroup: $found"
}

# check
start=$(date +%s)
"$meshbpf" check > "$work/check.out" 2> "$work/check.err"
rc=$?
{ echo "== meshbpf check: exit $rc"; cat "$work/check.out" "$work/check.err"; } >> "$log"
why=()
[ $rc -eq 5 ] || why+=("exit $rc, not 5 (the kernel lacks features)")
why_from unnamed "$work/check.out" table
result check $(($(date +%s) - start)) "${why[@]}"

# attach
start=$(date +%s)
"$meshbpf" attach --cgroup "$cgroup" --pin-dir "$pins" > "$work/attach.out" 2> "$work/attach.err"
rc=$?
{ echo "== meshbpf attach: exit $rc"; cat "$work/attach.out" "$work/attach.err"; } >> "$log"
why=()
[ $rc -eq 5 ] || why+=("exit $rc, not 5 (the kernel lacks features)")
why_from unnamed "$work/attach.err" error
why_from leftovers
result attach $(($(date +%s) - start)) "${why[@]}"

# agent
start=$(date +%s)
primary='{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"floor0","ipam":{"type":"host-local","subnet":"203.0.113.0/24"}}]}'
echo "$primary" > "$work/cni/net.d/10-pods.conflist"
port=19190
"$meshbpf" agent --cgroup "$cgroup" --pin-dir "$pins" --cni-bin-dir "$work/cni/bin" \
    --cni-conf-dir "$work/cni/net.d" --listen "127.0.0.1:$port" --no-discover \
    > "$work/agent.out" 2> "$work/agent.err" &
agent_pid=$!
why=()
code=
# Emulation is slow: up to 120 s for the agent to probe and serve.
for _ in $(seq 240); do
    code=$(curl -s -o "$work/healthz" -w '%{http_code}' "http://127.0.0.1:$port/healthz" 2>/dev/null)
    [ "$code" != 000 ] && [ -n "$code" ] && break
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.5
done
{ echo "== agent /healthz: HTTP ${code:-none}"; cat "$work/healthz" 2>/dev/null; } >> "$log"
if [ "$code" != 503 ]; then
    why+=("/healthz answered HTTP ${code:-nothing} (the agent exited or never served), not 503")
else
    why_from unnamed "$work/healthz" error
fi
[ -e "$work/cni/bin/meshbpf-cni" ] && why+=("the agent installed meshbpf-cni though nothing is attached")
[ "$(cat "$work/cni/net.d/10-pods.conflist")" = "$primary" ] ||
    why+=("the agent changed the primary conflist though nothing is attached")
why_from leftovers
kill -TERM "$agent_pid" 2>/dev/null
for _ in $(seq 60); do kill -0 "$agent_pid" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$agent_pid" 2>/dev/null; then
    why+=("the agent did not stop within 30 s of SIGTERM")
    kill -KILL "$agent_pid"
fi
wait "$agent_pid"
rc=$?
agent_pid=
{ echo "== meshbpf agent: exit $rc"; cat "$work/agent.out" "$work/agent.err"; } >> "$log"
[ $rc -eq 5 ] || why+=("the agent exited $rc, not 5 (the kernel lacks features)")
result agent $(($(date +%s) - start)) "${why[@]}"

[ $failures -eq 0 ]
