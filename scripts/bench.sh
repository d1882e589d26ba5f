#!/usr/bin/env bash
# Benchmarks (as root): `scripts/bench.sh compare` measures meshbpf against istio-iptables
# (report, JSON and SVG in target/bench-compare/); `scripts/bench.sh sockmap`, sockmap on vs off.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
meshbpf_require_root
meshbpf_install_deps
bench=${1:-compare}
cargo build --release --examples --quiet
cargo bench --quiet --bench "$bench"
