#!/usr/bin/env bash
# The README's quick start as a new user meets it: its two commands, as root, on a fresh
# Debian 12 machine that has only the Rust toolchain. The machine is a root file system made
# with `debootstrap --variant=minbase bookworm` from the Debian mirror this host's apt uses,
# with this host's Rust toolchain bind-mounted read-only, its CA and package-client
# configuration copied in as the host has it, DNS, and the checkout copied to /root/meshbpf
# (/root is 0700: a process that drops to another uid cannot enter the checkout). Nothing
# else: every package the commands need must be installed by the commands themselves.
#
# The commands run chrooted, in a private mount namespace (so the host sees none of its
# mounts) with the root bind-mounted onto itself (so `ip netns` works), /proc, /sys and
# /dev from the host, and CI=true (a privileged test that cannot run fails). The kernel is
# the host's, shared as a container's is.
#
# Usage (as root): .ci/fresh-machine.sh [ARGUMENTS FOR scripts/test.sh]
# Exit status: that of the first command that failed. The root is removed at the end; keep
# it for a look with MESHBPF_FRESH_KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
. scripts/deps.sh
meshbpf_require_root

step() { printf '\n==> [fresh machine] %s\n' "$*"; }

if ! command -v debootstrap >/dev/null; then
    step "installing debootstrap on this host"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

# Debian's repositories as this host's apt has them configured (no mirror is named here).
repos() { apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | sort -u; }
[ -n "$(repos)" ] || apt-get update -qq
mirror=$(repos | awk '$2 == "bookworm" { print $1; exit }')
[ -n "$mirror" ] || {
    echo "fresh-machine: this host's apt has no Debian 12 (bookworm) repository configured" >&2
    exit 1
}

work=$(mktemp -d /var/tmp/meshbpf-fresh.XXXXXX)
root=$work/root
cleanup() {
    local status=$?
    set +e
    # Processes the commands left behind in the root are ours: end them, by pid, and say so.
    local leftover=()
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && leftover+=("${p#/proc/}")
    done
    if [ ${#leftover[@]} -gt 0 ]; then
        echo "fresh-machine: processes left running in the fresh root, ended: ${leftover[*]}" >&2
        kill -KILL "${leftover[@]}" 2>/dev/null
        sleep 1
    fi
    if [ -n "${MESHBPF_FRESH_KEEP:-}" ]; then
        echo "fresh-machine: kept $work"
    elif findmnt -rn -o TARGET | grep -q "^$work/"; then
        # The mounts live in the commands' private namespace; one seen here is not ours.
        echo "fresh-machine: $work still has mounts; not removing it" >&2
    else
        rm -rf --one-file-system "$work"
    fi
    exit "$status"
}
trap cleanup EXIT

step "debootstrap --variant=minbase bookworm (mirror from this host's apt configuration)"
start=$SECONDS
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 30 "$work/debootstrap.log" >&2
    exit 1
}
echo "    $((SECONDS - start)) s"

# The host's package sources for Debian and its apt, pip and CA configuration, as a machine
# of this workplace has them; and name resolution.
repos | while read -r uri release; do echo "deb $uri $release main"; done >"$root/etc/apt/sources.list"
cp -a /etc/apt/apt.conf.d/. "$root/etc/apt/apt.conf.d/"
mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

# The checkout, with its history (the upgrade tests build earlier layouts from it), but not
# what this host built.
mkdir -p "$root/root/meshbpf"
chmod 0700 "$root/root"
tar -C "$repo" --exclude=./target -cf - . | tar -C "$root/root/meshbpf" -xf -

# The Rust toolchain, read-only; cargo's registry and caches are the fresh machine's own.
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=$(dirname "$(command -v cargo)")
mkdir -p "$root/root/.rustup" "$root/root/.cargo/bin"

# The environment a root shell on such a machine has: this host's, but for what names
# this host's paths or a running cargo.
while IFS= read -r -d '' kv; do
    case ${kv%%=*} in
        PATH | HOME | PWD | OLDPWD | SHLVL | _ | CARGO* | RUSTUP_HOME | RUSTUP_TOOLCHAIN | RUST_* | PYENV* | VIRTUAL_ENV | LD_*) ;;
        *) printf '%s\0' "$kv" ;;
    esac
done < <(env -0) >"$work/env"
printf '%s\0' HOME=/root CI=true \
    PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin >>"$work/env"

cat >"$work/enter.sh" <<'ENTER'
# Runs in the private mount namespace: the fresh machine's mounts, then the two commands.
set -euo pipefail
root=$1 rustup_home=$2 cargo_bin=$3 env_file=$4
shift 4
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755 tmpfs "$root/run"
mount --bind -o ro "$rustup_home" "$root/root/.rustup"
mount --bind -o ro "$cargo_bin" "$root/root/.cargo/bin"
mapfile -d '' environment <"$env_file"
exec chroot "$root" env -i "${environment[@]}" \
    bash -c 'cd /root/meshbpf && scripts/demo.sh && scripts/test.sh "$@"' test.sh "$@"
ENTER

step "scripts/demo.sh, then scripts/test.sh $*, as root in /root/meshbpf"
start=$SECONDS
status=0
unshare --mount --propagation private -- \
    bash "$work/enter.sh" "$root" "$rustup_home" "$cargo_bin" "$work/env" "$@" || status=$?
echo "    $((SECONDS - start)) s"
# The earlier layouts' binaries the upgrade tests built there (from this checkout's history,
# against the same Debian 12 libraries): vm/run.sh runs the upgrade tests on other kernels
# with them, as it does after a host run of scripts/test.sh.
for bin in "$root"/root/meshbpf/target/previous-layout/*/target/debug/meshbpf; do
    [ -f "$bin" ] || continue
    rel=${bin#"$root"/root/meshbpf/}
    [ -e "$repo/$rel" ] || install -D -m 0755 "$bin" "$repo/$rel"
done
exit "$status"
