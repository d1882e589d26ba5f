#!/usr/bin/env bash
# Benchmarks (as root).
#   scripts/bench.sh [--quick]
#       the headline (envoy), then the secondary sections (compare).
#   scripts/bench.sh envoy [--quick] [--rounds N] [--seconds S]
#       Istio's data plane: Envoy as the sidecar in both pods, nginx, wrk; modes direct,
#       capture-free limit, istio-iptables, meshbpf default, --sockmap, --intra-node; req/s,
#       p50/p99, CPU per request and the ratios. A full run writes docs/src/bench-envoy.md;
#       --quick (one round of a second) target/bench-envoy/.
#   scripts/bench.sh compare [--quick] [--only proxy,standin,bpf,scale,memory]
#       meshbpf against istio-iptables: HAProxy/nginx/wrk and the sidecar stand-in,
#       per-program BPF cost, map memory. A full run writes docs/bench-compare.{md,json,svg};
#       --quick (seconds per mode, small scale) or --only writes target/bench-compare/.
#   scripts/bench.sh sockmap [--only app|intranode] [--quick]
#       sockmap on vs off (markdown on stdout): application to sidecar, and intra-node
#       acceleration between two pods' sidecars (HAProxy, nginx, wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
meshbpf_require_root
meshbpf_install_bench_deps
benches=(envoy compare)
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    benches=("$1")
    shift
fi
# The compare benchmark turns kernel.bpf_stats_enabled on for a while and back off itself;
# this puts the value back should it be killed before it could.
stats=$(cat /proc/sys/kernel/bpf_stats_enabled)
trap 'echo "$stats" > /proc/sys/kernel/bpf_stats_enabled' EXIT
# The sidecar stand-in (examples/) and the workloads (test-support/) the benchmarks run.
cargo build --release --bins --examples --quiet
for bench in "${benches[@]}"; do
    args=("$@")
    # Without a benchmark named, each gets the options it knows (--quick is common).
    if [ ${#benches[@]} -gt 1 ] && [ "$bench" = envoy ]; then
        args=()
        for a in "$@"; do [ "$a" = --quick ] && args+=(--quick); done
    fi
    # Feature `bench`: the benchmarks require it (build.rs compiles their probe program then).
    cargo bench --quiet -p meshbpf --features bench --bench "$bench" -- "${args[@]}"
done
