#!/usr/bin/env bash
# CO-RE proof on other kernels: boots a Debian kernel in QEMU (emulated; see below) with this
# machine's root filesystem shared read-only over 9p and the checkout shared on its own at the
# same path (so a checkout under /tmp or /run, which the guest mounts tmpfs over, works too),
# and runs the very test binaries built here inside it. Run as root:
#   vm/run.sh [KERNEL] [TEST-BINARY-FILTER]        (or MESHBPF_VM_KERNEL=KERNEL vm/run.sh ...)
# MESHBPF_VM_TESTS=NAME runs only the tests whose name contains NAME in each binary (libtest's
# filter, handed to the guest on the kernel command line), e.g.
#   MESHBPF_VM_TESTS=bound_to_its_pod_address vm/run.sh 6.1 /parity-
# KERNEL is one of
#   6.1   Debian 12's own linux-image-amd64 (the default)
#   6.12  bookworm-backports' linux-image-amd64
#   5.10  bullseye's linux-image-amd64: below meshbpf's 5.15 floor, so the guest runs
#         vm/floor.sh (check, attach and the agent must refuse, naming what is missing)
#         instead of the test binaries
# The other suites' packages come through an apt source list of this script's own under
# target/vm/apt/ (the mirror is the host's, read from its apt configuration at run time):
# the machine's apt configuration and state are not touched. Results land in
# target/vm/<KERNEL>/results/; exit status 0 only if every test binary (or floor check)
# passed. A few tests are not run in the guest: vm/guest.sh lists them, each with its
# reason, and the summary repeats them.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/deps.sh
meshbpf_require_root
meshbpf_install_deps "${MESHBPF_VM_PACKAGES[@]}"
repo=$PWD
kernel=${MESHBPF_VM_KERNEL:-6.1}
case ${1:-} in 6.1 | 6.12 | 5.10) kernel=$1; shift ;; esac
case $kernel in
    6.1) suite= ;;
    6.12) suite=bookworm-backports ;;
    5.10) suite=bullseye ;;
    *) echo "vm/run.sh: unknown kernel '$kernel'; choose 6.1, 6.12 or 5.10" >&2; exit 2 ;;
esac
# The guest learns the path from the kernel command line, which splits at spaces.
case $repo in *[[:space:]]*)
    echo "vm/run.sh: the checkout's path ($repo) has a space; move it to one without" >&2
    exit 1 ;;
esac
tests=${MESHBPF_VM_TESTS:-}
case $tests in *[!A-Za-z0-9_:]*)
    echo "vm/run.sh: MESHBPF_VM_TESTS='$tests' is not a test-name filter (letters, digits, _ and :: only)" >&2
    exit 2 ;;
esac
# The guest is stopped after this long: .ci/run sets it from what is left of CI's 90
# minutes; an hour otherwise.
vm_timeout=${MESHBPF_VM_TIMEOUT:-3600}
case $vm_timeout in '' | *[!0-9]* | 0)
    echo "vm/run.sh: MESHBPF_VM_TIMEOUT='$vm_timeout' is not a number of seconds above 0" >&2
    exit 2 ;;
esac
vm=$repo/target/vm/$kernel
results=$vm/results
mkdir -p "$vm"

# apt with a source list, lists, cache and status of its own (another suite's kernel): the
# host's apt configuration, state and cache stay as they were.
apt_dir=$repo/target/vm/apt/${suite:-host}
apt_own() {
    local tool=$1; shift
    "$tool" -o Dir::Etc::SourceList="$apt_dir/sources.list" -o Dir::Etc::SourceParts=- \
        -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" \
        -o Dir::State::Status="$apt_dir/status" -o Debug::NoLocking=1 "$@"
}
if [ -n "$suite" ]; then
    # The host's own Debian mirror, from its apt configuration (no host name written here).
    mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' | awk '$2 == "bookworm" { print $1; exit }')
    if [ -z "$mirror" ]; then
        echo "vm/run.sh: the host's apt configuration has no Debian 12 (bookworm) source to take the mirror from; add one, or set up $apt_dir/sources.list by hand" >&2
        exit 1
    fi
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    : > "$apt_dir/status"
    echo "deb $mirror $suite main" > "$apt_dir/sources.list"
    echo "==> reading $suite's package index from $mirror (apt state under ${apt_dir#$repo/})"
    apt_own apt-get -qq update
    cache() { apt_own apt-cache "$@"; }
    fetch() { apt_own apt-get download "$@"; }
else
    cache() { apt-cache "$@"; }
    fetch() { apt-get download "$@"; }
fi

# The kernel: whatever linux-image-amd64 points at in that suite.
pkg=$(cache depends linux-image-amd64 | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)/\1/p' | head -1)
if [ -z "$pkg" ]; then
    echo "vm/run.sh: no linux-image-amd64 in ${suite:-bookworm}'s index; run apt-get update" >&2
    exit 1
fi
kver=${pkg#linux-image-}
if [ ! -f "$vm/kernel/boot/vmlinuz-$kver" ]; then
    echo "==> fetching $pkg"
    rm -rf "$vm/kernel" "$vm/deb" && mkdir -p "$vm/deb"
    (cd "$vm/deb" && fetch "$pkg" 2>/dev/null)
    dpkg-deb -x "$vm"/deb/*.deb "$vm/kernel"
    depmod -b "$vm/kernel" "$kver"
fi

if [ "$kernel" = 5.10 ]; then
    # Below the floor the guest runs vm/floor.sh with the meshbpf binary alone.
    echo "==> building meshbpf (below the floor the guest checks its refusal: vm/floor.sh)"
    cargo build --quiet --bins
    : > "$vm/tests.list"
else
    echo "==> building the test binaries (the same ones CI runs)"
    cargo build --quiet --bins --examples
    cargo test --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*"' | cut -d'"' -f4 \
        | grep '/deps/' | sort -u > "$vm/tests.all"
    grep -e "${1:-.}" "$vm/tests.all" > "$vm/tests.list" || true
    echo "    $(wc -l < "$vm/tests.list") test binaries"
fi
# The binaries a TEST-BINARY-FILTER left out, named in the summary with the filter.
unselected=
if [ -n "${1:-}" ] && [ "$kernel" != 5.10 ]; then
    unselected=$(grep -v -x -F -f "$vm/tests.list" "$vm/tests.all" | xargs -rn1 basename \
        | sed 's/-[0-9a-f]*$//' | sort -u | tr '\n' ' ')
fi

echo "==> building the initramfs (busybox + the 9p modules of $kver)"
init=$vm/initramfs
rm -rf "$init" && mkdir -p "$init"/{bin,modules,proc,sys,dev,newroot}
cp /bin/busybox "$init/bin/busybox"
# The guest's scripts travel in the initramfs: bash reads a script as it runs it, and the
# checkout's copy may be edited meanwhile.
cp vm/guest.sh vm/floor.sh "$init/"
moddir=$vm/kernel/lib/modules/$kver
# Load order for 9p over virtio-pci: each module after the modules it depends on. A module
# built into the kernel (6.12 builds virtio_pci in) is not loaded; 6.12's modules come
# xz-compressed (.ko.xz), which busybox's insmod cannot read: they go in decompressed.
order=()
load() {
    local m=$1 dep
    for seen in "${order[@]:-}"; do [ "$seen" = "$m" ] && return; done
    grep -qE "(^|/)$m\.ko$" "$moddir/modules.builtin" && return
    for dep in $(grep -E "(^|/)$m\.ko(\.xz|\.zst)?:" "$moddir/modules.dep" | cut -d: -f2); do
        dep=$(basename "$dep"); load "${dep%%.ko*}"
    done
    order+=("$m")
}
for m in virtio_pci 9pnet_virtio 9p; do load "$m"; done
for m in "${order[@]}"; do
    ko=$(find "$moddir" -name "$m.ko*" | head -1)
    if [ -z "$ko" ]; then echo "vm/run.sh: $kver has no module $m" >&2; exit 1; fi
    case $ko in
        *.xz) xz -dc "$ko" > "$init/modules/$m.ko" ;;
        *.zst) zstd -qdc "$ko" > "$init/modules/$m.ko" ;;
        *) cp "$ko" "$init/modules/" ;;
    esac
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
mkdir -p /newroot/run/meshbpf && cp /guest.sh /floor.sh /newroot/run/meshbpf/
for d in proc sys dev; do mount --move /$d /newroot/$d; done
exec switch_root /newroot /bin/bash /run/meshbpf/guest.sh
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
# The limit (MESHBPF_VM_TIMEOUT, above) keeps CI within its 90 minutes.
timeout "$vm_timeout" qemu-system-x86_64 -machine accel=$accel -cpu $cpu -m 4096 -smp 2 \
    -nographic -no-reboot -nic none \
    -kernel "$vm/kernel/boot/vmlinuz-$kver" -initrd "$vm/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet meshbpf_repo=$repo meshbpf_kernel=$kernel${tests:+ meshbpf_tests=$tests}" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=passthrough,readonly=on,multidevs=remap \
    -virtfs local,path="$repo",mount_tag=repo,security_model=passthrough,readonly=on,multidevs=remap \
    -virtfs local,path="$results",mount_tag=results,security_model=passthrough \
    > "$vm/console.log" 2>&1 || true

echo "==> results (kernel $(cat "$results/kernel" 2>/dev/null || echo '?'))"
if [ ! -f "$results/done" ]; then
    echo "the VM did not finish (stopped after ${vm_timeout} s, or it crashed); see $vm/console.log" >&2
    cat "$results/summary.txt" 2>/dev/null >&2
    tail -20 "$vm/console.log" >&2
    exit 1
fi
grep -hE '^test .* \.\.\. (ok|FAILED)( <[0-9.]+s>)?$' "$results"/*.log 2>/dev/null | sort > "$results/per-test.txt" || true
cat "$results/filter" 2>/dev/null || true
cat "$results/summary.txt"
cat "$results/skipped.txt" 2>/dev/null || true
[ -z "$unselected" ] || echo "not selected (the binary filter '$1'): $unselected"
# A failure's own words, so a CI log that shows only this script's output still says why.
for log in "$results"/*.log; do
    [ -f "$log" ] || continue
    if [ "$(basename "$log")" = floor.log ]; then
        grep -q FAILED "$results/summary.txt" && { echo "==> floor: what meshbpf said"; cat "$log"; }
        continue
    fi
    grep -q '^test result: FAILED' "$log" || continue
    echo "==> $(basename "$log" .log): the failures"
    sed -n '/^failures:$/,/^test result:/p' "$log" | tail -150
done
echo "==> vm/run.sh $kernel: $SECONDS s in all (kernel fetch, build and boot included)"
! grep -q FAILED "$results/summary.txt"
