#!/usr/bin/env bash
# Packages the library crate for crates.io. Compiles the BPF objects (needs clang) and puts
# them in bpf-prebuilt/ (never committed), which the package ships: a build without clang,
# such as docs.rs's, generates the skeleton from them (build/main.rs, DOCS_RS). Then checks
# that such a build documents the crate, and runs `cargo package`.
#   scripts/package.sh [cargo package options: --no-verify (no build from the package, which
#   needs the crates.io index), --list]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(cargo build -p meshbpf --lib --quiet --message-format=json | python3 -c '
import json, os, sys
for line in sys.stdin:
    msg = json.loads(line)
    out = msg.get("out_dir") or ""
    if msg.get("reason") == "build-script-executed" and os.path.exists(out + "/meshbpf.bpf.o"):
        print(out)
')
mkdir -p bpf-prebuilt
cp "$out/meshbpf.bpf.o" "$out/bpf-objs/lookup.bpf.o" bpf-prebuilt/
# As docs.rs builds: DOCS_RS set and no clang to be found (its own target dir, so that the
# main one keeps its BPF build).
DOCS_RS=1 MESHBPF_CLANG=/nonexistent/clang CARGO_TARGET_DIR=target/docs-rs \
    cargo doc --quiet --no-deps -p meshbpf --features cli
# --allow-dirty: bpf-prebuilt/ is generated, not in git.
cargo package -p meshbpf --allow-dirty "$@"
