#!/usr/bin/env bash
# CI helper: vm/run.sh on several guest kernels at once (each keeps to its own
# target/vm/<KERNEL>/), each one's output prefixed with its kernel and kept whole in
# target/vm/<KERNEL>.log; exit status 0 only if every one passed. Run as root:
#   .ci/kernels.sh 6.1 5.10
#   .ci/kernels.sh 6.12:sockmap,intranode,parity     (only those test binaries)
# KERNEL:BINARY,... runs only the named test binaries in that guest (vm/run.sh's binary
# filter; the run's summary names the binaries it left out). MESHBPF_VM_TIMEOUT (seconds)
# stops each guest after that long, as vm/run.sh does; .ci/run sets it from what is left of
# CI's 90 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: .ci/kernels.sh KERNEL[:BINARY,...]... (KERNEL: 6.1, 6.12, 5.10)" >&2; exit 2; }
kernels=() filters=()
for arg in "$@"; do
    k=${arg%%:*} bins=
    [ "$k" != "$arg" ] && bins=${arg#*:}
    case $k in 6.1 | 6.12 | 5.10) ;; *) echo ".ci/kernels.sh: unknown kernel '$k'; choose 6.1, 6.12 or 5.10" >&2; exit 2 ;; esac
    case $bins in *[!A-Za-z0-9_,]* | ,* | *, | *,,*)
        echo ".ci/kernels.sh: '$bins' is not a list of test binaries (names like sockmap,intranode)" >&2
        exit 2 ;;
    esac
    kernels+=("$k")
    # vm/run.sh's filter is a grep pattern on the binaries' paths (target/debug/deps/NAME-HASH).
    if [ -n "$bins" ]; then filters+=("/\\(${bins//,/\\|}\\)-[0-9a-f]*\$"); else filters+=(""); fi
done
# What vm/run.sh installs, before the build below needs it (a new machine has no clang).
. scripts/deps.sh
meshbpf_require_root
meshbpf_install_deps "${MESHBPF_VM_PACKAGES[@]}"
mkdir -p target/vm
# The test binaries are built once before the guests start (each vm/run.sh builds again,
# finding nothing to do), so the guests do not wait on cargo's lock in turn.
cargo build --quiet --bins --examples && cargo test --no-run --quiet 2>/dev/null
pids=()
for i in "${!kernels[@]}"; do
    vm/run.sh "${kernels[$i]}" ${filters[$i]:+"${filters[$i]}"} > "target/vm/${kernels[$i]}.log" 2>&1 &
    pids+=($!)
done
failed=()
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${kernels[$i]}")
done
for k in "${kernels[@]}"; do sed "s/^/[$k] /" "target/vm/$k.log"; done
if [ ${#failed[@]} -gt 0 ]; then
    echo "==> .ci/kernels.sh: failed on ${failed[*]}" >&2
    exit 1
fi
echo "==> .ci/kernels.sh: passed on ${kernels[*]}"
