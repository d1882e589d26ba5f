#!/usr/bin/env bash
# Benchmarks (as root): `scripts/bench.sh sockmap` measures sockmap on vs off.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
meshbpf_require_root
meshbpf_install_deps
bench=${1:-sockmap}
cargo build --release --examples --quiet
cargo bench --quiet --bench "$bench"
