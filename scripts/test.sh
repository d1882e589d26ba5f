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
# build.rs also compiles the BPF programs against the other architecture's vmlinux.h.
cargo build --quiet

# Unit, end-to-end and doc tests; `cargo test` also builds examples/ and the test-support
# workloads, which the end-to-end tests run. Benchmarks are not run here: see scripts/bench.sh.
cargo test "$@"
