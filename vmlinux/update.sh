#!/usr/bin/env bash
# Regenerate vmlinux/<arch>/vmlinux.h from a kernel's BTF.
# Usage: vmlinux/update.sh [BTF_FILE] [ARCH]
#   BTF_FILE defaults to the running kernel's /sys/kernel/btf/vmlinux,
#   ARCH to this machine's (x86 or arm64, the names build.rs looks for).
set -euo pipefail
btf=${1:-/sys/kernel/btf/vmlinux}
arch=${2:-$(uname -m)}
case "$arch" in
  x86_64|x86) arch=x86 ;;
  aarch64|arm64) arch=arm64 ;;
  *) echo "unsupported architecture: $arch" >&2; exit 1 ;;
esac
command -v bpftool >/dev/null || { echo "bpftool not found: apt-get install bpftool" >&2; exit 1; }
dir=$(dirname "$0")/$arch
mkdir -p "$dir"
bpftool btf dump file "$btf" format c > "$dir/vmlinux.h.tmp"
mv "$dir/vmlinux.h.tmp" "$dir/vmlinux.h"
echo "wrote $dir/vmlinux.h from $btf"
