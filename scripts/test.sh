#!/usr/bin/env bash
# The test suite: unit tests, BPF end-to-end tests with real pods, doc tests.
# Run as root on Debian 12: installs what it needs, then runs `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
meshbpf_require_root
meshbpf_install_deps
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --all -- --check
fi
cargo build --quiet
# The BPF programs also build for the other architecture whose vmlinux.h is committed
# (build.rs compiles only for the target's): catches a type that one kernel lacks.
headers=$(find target -type d -path '*/out/libbpf-headers' | head -1)
other=arm64; [ "$(uname -m)" = aarch64 ] && other=x86
for src in src/bpf/*.bpf.c; do
    "${MESHBPF_CLANG:-clang-19}" -g -O2 -target bpf -Wall -Werror -D__TARGET_ARCH_$other -Ivmlinux/$other -Isrc/bpf \
        -I "$headers" -c "$src" -o /dev/null
done
echo "BPF programs also compile for $other"

# Unit, end-to-end and doc tests; `cargo test` also builds examples/, which the
# end-to-end tests run. Benchmarks are not run here: see scripts/bench.sh.
cargo test "$@"
