#!/usr/bin/env bash
# Regenerates vmlinux/<arch>/vmlinux.h from a kernel's BTF.
#
#   vmlinux/update.sh                      # this machine's running kernel
#   vmlinux/update.sh BTF_FILE ARCH        # a raw BTF file (e.g. /sys/kernel/btf/vmlinux)
#   vmlinux/update.sh --image IMAGE ARCH   # an uncompressed kernel image (arm64 Image,
#                                          # vmlinux), such as the vmlinuz of Debian's
#                                          # linux-image-<ver>-arm64 package
#
# ARCH is x86 or arm64 (x86_64/aarch64 accepted), the names build.rs looks for. The
# committed arm64 header comes from Debian 12's linux-image-6.1.0-56-arm64 by --image:
# CO-RE relocates against the running kernel, so any recent kernel's types serve.
set -euo pipefail
command -v bpftool >/dev/null || { echo "bpftool not found: apt-get install bpftool" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ "${1:-}" = --image ]; then
    image=$2 arch=$3
    # The BTF blob sits in the image as-is: find its header (magic 0xeB9F, version 1,
    # 24-byte header, types then strings) and cut it out.
    python3 - "$image" "$tmp/btf" <<'PY'
import struct, sys
img = open(sys.argv[1], 'rb').read()
at = 0
while True:
    at = img.find(b'\x9f\xeb\x01\x00', at)
    if at < 0:
        sys.exit('no BTF found in the image')
    hdr, toff, tlen, soff, slen = struct.unpack_from('<IIIII', img, at + 4)
    if hdr == 24 and toff == 0 and soff == tlen and tlen > 1_000_000:
        open(sys.argv[2], 'wb').write(img[at:at + hdr + tlen + slen])
        break
    at += 1
PY
    btf=$tmp/btf
else
    btf=${1:-/sys/kernel/btf/vmlinux}
    arch=${2:-$(uname -m)}
fi
case "$arch" in
  x86_64|x86) arch=x86 ;;
  aarch64|arm64) arch=arm64 ;;
  *) echo "unsupported architecture: $arch" >&2; exit 1 ;;
esac
dir=$(dirname "$0")/$arch
mkdir -p "$dir"
bpftool btf dump file "$btf" format c > "$dir/vmlinux.h.tmp"
mv "$dir/vmlinux.h.tmp" "$dir/vmlinux.h"
echo "wrote $dir/vmlinux.h"
