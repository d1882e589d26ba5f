#!/usr/bin/env bash
# CO-RE proof on a second kernel: boots Debian 12's own kernel (linux-image-amd64, 6.1)
# in QEMU (emulated; see below) with this machine's root filesystem shared read-only over
# 9p and the checkout shared on its own at the same path (so a checkout under /tmp or /run,
# which the guest mounts tmpfs over, works too), and runs the very test binaries built here
# inside it. Results per test land in target/vm/results/; exit status 0 only if every test
# binary passed. A few tests are not run in the guest: vm/guest.sh lists them, each with
# its reason, and the summary repeats them. Run as root: vm/run.sh [TEST-BINARY-FILTER]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
meshbpf_require_root
meshbpf_install_deps qemu-system-x86 busybox-static kmod cpio
repo=$PWD
# The guest learns the path from the kernel command line, which splits at spaces.
case $repo in *[[:space:]]*)
    echo "vm/run.sh: the checkout's path ($repo) has a space; move it to one without" >&2
    exit 1 ;;
esac
vm=$repo/target/vm
results=$vm/results
mkdir -p "$vm"

# The kernel: whatever linux-image-amd64 points at in Debian 12 (6.1.x).
pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)/\1/p' | head -1)
kver=${pkg#linux-image-}
if [ ! -f "$vm/kernel/boot/vmlinuz-$kver" ]; then
    echo "==> fetching $pkg"
    rm -rf "$vm/kernel" "$vm/deb" && mkdir -p "$vm/deb"
    (cd "$vm/deb" && apt-get download "$pkg" 2>/dev/null)
    dpkg-deb -x "$vm"/deb/*.deb "$vm/kernel"
    depmod -b "$vm/kernel" "$kver"
fi

echo "==> building the test binaries (the same ones CI runs)"
cargo build --quiet --bins --examples
cargo test --no-run --message-format=json 2>/dev/null \
    | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 \
    | grep '/deps/' | sort -u | grep -e "${1:-.}" > "$vm/tests.list"
echo "    $(wc -l < "$vm/tests.list") test binaries"

echo "==> building the initramfs (busybox + the 9p modules of $kver)"
init=$vm/initramfs
rm -rf "$init" && mkdir -p "$init"/{bin,modules,proc,sys,dev,newroot}
cp /bin/busybox "$init/bin/busybox"
moddir=$vm/kernel/lib/modules/$kver
# Load order for 9p over virtio-pci: each module after the modules it depends on.
order=()
load() {
    local m=$1 dep
    for seen in "${order[@]:-}"; do [ "$seen" = "$m" ] && return; done
    for dep in $(grep -E "(^|/)$m\.ko:" "$moddir/modules.dep" | cut -d: -f2); do load "$(basename "$dep" .ko)"; done
    order+=("$m")
}
for m in virtio_pci 9pnet_virtio 9p; do load "$m"; done
for m in "${order[@]}"; do
    cp "$(find "$moddir" -name "$m.ko" | head -1)" "$init/modules/"
    echo "$m" >> "$init/modules/order"
done
cat > "$init/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /newroot || { echo "9p root failed"; poweroff -f; }
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
# The checkout at its own path, also where the tmpfs mounts above hide the host's.
[ -d "/newroot$meshbpf_repo" ] || mkdir -p "/newroot$meshbpf_repo"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 repo "/newroot$meshbpf_repo" || { echo "9p checkout failed"; poweroff -f; }
for d in proc sys dev; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /bin/bash "$meshbpf_repo/vm/guest.sh"
INIT
chmod +x "$init/init"
(cd "$init" && find . | cpio -o -H newc --quiet | gzip -1) > "$vm/initramfs.cpio.gz"

rm -rf "$results" && mkdir -p "$results"
# Emulation by default: on this project's machines KVM is nested and the guest kernel hangs
# early under it (QEMU also trips over MSR 0x10a with -cpu host). MESHBPF_VM_ACCEL=kvm
# tries it anyway where KVM is first-level.
accel=${MESHBPF_VM_ACCEL:-tcg}; cpu=max
[ "$accel" = kvm ] && cpu=host,-arch-capabilities
echo "==> booting Linux $kver ($accel); the suite runs inside"
# The limit keeps CI (the suite, then this) within its 90 minutes.
timeout 3600 qemu-system-x86_64 -machine accel=$accel -cpu $cpu -m 4096 -smp 2 \
    -nographic -no-reboot -nic none \
    -kernel "$vm/kernel/boot/vmlinuz-$kver" -initrd "$vm/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet meshbpf_repo=$repo" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
    -virtfs local,path="$repo",mount_tag=repo,security_model=passthrough,readonly=on,multidevs=remap \
    -virtfs local,path="$results",mount_tag=results,security_model=passthrough \
    > "$vm/console.log" 2>&1 || true

echo "==> results (kernel $(cat "$results/kernel" 2>/dev/null || echo '?'))"
if [ ! -f "$results/done" ]; then
    echo "the VM did not finish; see $vm/console.log" >&2
    tail -20 "$vm/console.log" >&2
    exit 1
fi
grep -hE '^test .* \.\.\. (ok|FAILED)( <[0-9.]+s>)?$' "$results"/*.log | sort > "$results/per-test.txt" || true
cat "$results/summary.txt"
cat "$results/skipped.txt" 2>/dev/null || true
# A failure's own words, so a CI log that shows only this script's output still says why.
for log in "$results"/*.log; do
    grep -q '^test result: FAILED' "$log" || continue
    echo "==> $(basename "$log" .log): the failures"
    sed -n '/^failures:$/,/^test result:/p' "$log" | tail -150
done
! grep -q FAILED "$results/summary.txt"
