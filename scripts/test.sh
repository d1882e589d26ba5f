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

# The book (docs/): mdBook from crates.io, installed once into target/tools (4.5 minutes to
# build on this project's 2-vCPU machines; nothing when it is there), built into target/book.
# cli/tests/docs.rs (run by `cargo test` below) builds it again, checks every link and anchor of
# its pages and of the README, and that docs/src/cli.md is the binary's own --help.
mdbook_version=0.5.4
mdbook="$PWD/target/tools/bin/mdbook"
if [ "$("$mdbook" --version 2>/dev/null)" != "mdbook v$mdbook_version" ]; then
    start=$SECONDS
    cargo install mdbook --locked --version "$mdbook_version" --no-default-features \
        --features search --root target/tools
    echo "==> mdbook $mdbook_version installed in $((SECONDS - start)) s"
fi
"$mdbook" build docs
export MESHBPF_MDBOOK="$mdbook"

# Unit, end-to-end and doc tests; `cargo test` also builds examples/ and the test-support
# workloads, which the end-to-end tests run. Benchmarks are not run here: see scripts/bench.sh.
cargo test "$@"

# The whole suite (no arguments): the library's docs build with its default features (none:
# as a mesh tool depending on it gets them) and no rustdoc warning (a link to an item that
# is private or behind a feature), and the crate packages and builds from its package, also
# as docs.rs builds it (no clang): scripts/package.sh.
if [ $# -eq 0 ]; then
    RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet -p meshbpf
    scripts/package.sh
fi
