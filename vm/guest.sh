#!/bin/bash
# Runs inside the VM that vm/run.sh boots: the host's root read-only over 9p, the checkout
# at its own path (shared on its own, so /tmp and /run checkouts work too), the guest
# kernel's own modules (vm/run.sh's target/vm/<KERNEL>/, named on the kernel command line),
# and every test binary; results go to the `results` share. Below meshbpf's floor (5.15)
# it runs vm/floor.sh instead: meshbpf must refuse there. This script and floor.sh run from
# the copies vm/run.sh put in the initramfs (/run/meshbpf/), so editing the checkout while
# a guest runs does not change what it runs.
set -u
repo=$meshbpf_repo
vmdir=$repo/target/vm/$meshbpf_kernel
kver=$(uname -r)
# Emulation runs some 10 to 30 times slower: the harness's hang guards stretch with it.
# The long tests run the same behaviours on 64 times fewer bytes, connections and
# iterations, and their kill loops stop at every fourth point (tests/common: test_scale).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin CI=1 MESHBPF_TEST_TIMEOUT_SCALE=4 \
    MESHBPF_TEST_SCALE=64
mkdir -p /tmp/results && mount -t 9p -o trans=virtio,version=9p2000.L results /tmp/results
out=/tmp/results
echo "$kver" > $out/kernel
# MESHBPF_VM_TESTS on the host (vm/run.sh): only the tests whose name contains it.
meshbpf_tests=${meshbpf_tests:-}
[ -n "$meshbpf_tests" ] && echo "only tests whose name contains $meshbpf_tests" > $out/filter

# The host root has no modules for this kernel: point the kernel's module loader (what
# iptables-nft, veth, bridge, MPTCP... need, loaded on demand as on the host) at the
# extracted package.
cat > /run/modprobe <<EOF
#!/bin/sh
exec /usr/sbin/modprobe -d "$vmdir/kernel" "\$@"
EOF
chmod 755 /run/modprobe
echo /run/modprobe > /proc/sys/kernel/modprobe
# What a booted system has and the tests expect: loopback up in the initial namespace (the
# agent serves /metrics there), /dev/shm, a writable CNI cache (/var/lib/cni: podman's CNI
# backend keeps its results there), and the host's hybrid cgroup layout: v1 controllers and
# the cgroup2 hierarchy at /sys/fs/cgroup/unified, where runc (cgroupfs driver, for podman
# and containerd) makes each container's cgroup in every hierarchy, as on the host. The
# tests attach only below cgroup2 mounts of their own (the same hierarchy), never its root.
ip link set lo up
mkdir -p /dev/shm && mount -t tmpfs -o mode=1777 shm /dev/shm
[ -d /var/lib/cni ] && mount -t tmpfs -o mode=700 cni /var/lib/cni
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
# (6.12 lists cpuset and memory there but Debian builds it without their v1 interface.)
for c in $(awk '!/^#/ && $4 == 1 { print $1 }' /proc/cgroups); do
    mkdir -p /sys/fs/cgroup/$c
    mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c 2>/dev/null || rmdir /sys/fs/cgroup/$c
done
mkdir -p /sys/fs/cgroup/unified && mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified

# Below the floor: no test binary, the refusal instead (check, attach, agent).
if [ "$(printf '%s\n' "$kver" 5.15 | sort -V | head -1)" != 5.15 ]; then
    : > $out/summary.txt
    echo "not run (all test binaries): Linux $kver is below meshbpf's 5.15 floor; vm/floor.sh checks the refusal instead" > $out/skipped.txt
    bash /run/meshbpf/floor.sh "$repo/target/debug/meshbpf" $out
    touch $out/done
    sync
    poweroff -f
fi

# Not run here, each with the reason the summary gives: what involves no kernel at all, and
# one test that cannot keep its own timing under emulation. Everything else runs, the long
# tests on MESHBPF_TEST_SCALE's smaller sizes; the host suite runs all of it at full size.
declare -A skipped=(
    [the_demo_shows_captured_traffic_and_cleans_up_even_when_interrupted]="it times its interruptions against its own uninterrupted run, which emulation stretches past the harness timeout (its capture and cleanup run here in every other test)"
)
declare -A skipped_binaries=(
    [deploy]="the manifests against Kubernetes' schemas (Python): no kernel involved"
    [chart]="the Helm chart, rendered by helm-python-sdk (Python, on the host only); its capability test loads the programs the others run here, under setpriv"
    [docs]="the book's links and its CLI page against --help (mdbook, which scripts/test.sh installs on the host only): no kernel involved"
    [layers]="the source tree's module graph: no kernel involved"
    [istio]="the Sidecar resource and the injection values, generated in userspace: no kernel involved"
)
if ! ls "$repo"/target/previous-layout/*/target/debug/meshbpf >/dev/null 2>&1; then
    skipped_binaries[upgrade]="the earlier layouts' builds are missing: the host suite (scripts/test.sh) makes them under target/previous-layout/, run it first"
fi
skip_args=()
for t in "${!skipped[@]}"; do skip_args+=(--skip "$t"); done

"$repo/target/debug/meshbpf" check > $out/check.txt 2>&1
echo "meshbpf check: exit $?" >> $out/check.txt
: > $out/summary.txt
for t in "${!skipped_binaries[@]}"; do echo "skipped $t (all): ${skipped_binaries[$t]}"; done > $out/skipped.txt
for t in "${!skipped[@]}"; do echo "skipped $t: ${skipped[$t]}"; done >> $out/skipped.txt
while read -r exe; do
    name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
    [ -n "${skipped_binaries[$name]:-}" ] && continue
    start=$(date +%s)
    # RUSTC_BOOTSTRAP only lets libtest print each test's time (--report-time).
    RUSTC_BOOTSTRAP=1 "$exe" --test-threads=2 -Z unstable-options --report-time \
        "${skip_args[@]}" ${meshbpf_tests:+"$meshbpf_tests"} > "$out/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    line=$(grep -E '^test result:' "$out/$name.log" | tail -1)
    if [ $rc -eq 0 ]; then
        echo "ok      $name (${secs}s): $line" >> $out/summary.txt
    else
        echo "FAILED  $name (${secs}s, exit $rc): ${line:-no result line}" >> $out/summary.txt
    fi
done < "$vmdir/tests.list"
touch $out/done
sync
poweroff -f
