//! Compiling the BPF C with libbpf-cargo, for this target's architecture or another's.

use std::ffi::OsString;
use std::path::Path;

use libbpf_cargo::SkeletonBuilder;

use crate::BPF_DIR;

/// The architectures with a committed `vmlinux/<arch>/vmlinux.h`, by Rust target name.
pub const ARCHES: [(&str, &str); 2] = [("x86_64", "x86"), ("aarch64", "arm64")];

/// `connect.bpf.c` → `connect.bpf.o`.
pub fn object_name(src: &Path) -> Result<String, String> {
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("bad source name")?;
    Ok(name.replace(".bpf.c", ".bpf.o"))
}

/// The `vmlinux/<arch>` directory that matches the target.
pub fn vmlinux_arch(target: &str) -> Result<&'static str, String> {
    let arch = ARCHES
        .iter()
        .find(|(t, _)| *t == target)
        .map(|(_, a)| *a)
        .ok_or_else(|| {
            format!(
                "no vmlinux.h for target architecture {target:?}; generate one on such a \
                 machine with vmlinux/update.sh"
            )
        })?;
    if Path::new("vmlinux").join(arch).join("vmlinux.h").exists() {
        Ok(arch)
    } else {
        Err(format!(
            "vmlinux/{arch}/vmlinux.h is missing; generate it on a {arch} machine with \
             vmlinux/update.sh"
        ))
    }
}

/// Compiles one program with libbpf-cargo (which adds libbpf's headers, `-g -O2 -target
/// bpf` and `-fno-stack-protector`); only what this project adds is passed here.
pub fn compile(clang: &Path, src: &Path, obj: &Path, arch: &str) -> Result<(), String> {
    SkeletonBuilder::new()
        .source(src)
        .obj(obj)
        .clang(clang)
        .clang_args([
            OsString::from("-Wall"),
            OsString::from("-Werror"),
            OsString::from(format!("-D__TARGET_ARCH_{arch}")),
            OsString::from(format!("-Ivmlinux/{arch}")),
            OsString::from(format!("-I{BPF_DIR}")),
        ])
        .build()
        .map_err(|e| format!("{e:#}"))
}
