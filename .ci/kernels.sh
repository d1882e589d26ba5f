#!/usr/bin/env bash
# CI helper: vm/run.sh on several guest kernels at once (each keeps to its own
# target/vm/<KERNEL>/), each one's output prefixed with its kernel and kept whole in
# target/vm/<KERNEL>.log; exit status 0 only if every one passed. For .ci/run to call when
# the guests are chosen (docs/kernels.md has each one's time). Run as root:
#   .ci/kernels.sh 6.1 6.12 5.10
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: .ci/kernels.sh KERNEL... (6.1, 6.12, 5.10)" >&2; exit 2; }
for k in "$@"; do
    case $k in 6.1 | 6.12 | 5.10) ;; *) echo ".ci/kernels.sh: unknown kernel '$k'; choose 6.1, 6.12 or 5.10" >&2; exit 2 ;; esac
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
for k in "$@"; do
    vm/run.sh "$k" > "target/vm/$k.log" 2>&1 &
    pids+=($!)
done
failed=()
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed+=("${*:i+1:1}")
done
for k in "$@"; do sed "s/^/[$k] /" "target/vm/$k.log"; done
if [ ${#failed[@]} -gt 0 ]; then
    echo "==> .ci/kernels.sh: failed on ${failed[*]}" >&2
    exit 1
fi
echo "==> .ci/kernels.sh: passed on $*"
