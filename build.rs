//! Compiles every `src/bpf/*.bpf.c` (one per concern) with clang, links them
//! into one BPF object with libbpf's static linker, and generates the
//! libbpf-rs skeleton for it into `OUT_DIR`.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;
use libbpf_rs::Linker;

const MIN_CLANG: u32 = 16;
const BPF_DIR: &str = "src/bpf";

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    let arch = vmlinux_arch()?;
    let clang = find_clang()?;

    println!("cargo:rerun-if-env-changed=MESHBPF_CLANG");
    println!("cargo:rerun-if-changed=vmlinux");
    println!("cargo:rerun-if-changed={BPF_DIR}");
    let mut sources = Vec::new();
    for entry in fs::read_dir(BPF_DIR).map_err(|e| format!("reading {BPF_DIR}: {e}"))? {
        let path = entry.map_err(|e| e.to_string())?.path();
        println!("cargo:rerun-if-changed={}", path.display());
        if path.to_string_lossy().ends_with(".bpf.c") {
            sources.push(path);
        }
    }
    for entry in fs::read_dir(format!("vmlinux/{arch}")).map_err(|e| e.to_string())? {
        println!(
            "cargo:rerun-if-changed={}",
            entry.map_err(|e| e.to_string())?.path().display()
        );
    }
    // The object that defines the maps goes first: the linker resolves the
    // others' extern map declarations against it.
    sources.sort_by_key(|p| (!p.ends_with("maps.bpf.c"), p.clone()));

    let headers = out_dir.join("libbpf-headers");
    write_libbpf_headers(&headers)?;

    let objs_dir = out_dir.join("bpf-objs");
    fs::create_dir_all(&objs_dir).map_err(|e| e.to_string())?;
    let linked = out_dir.join("meshbpf.bpf.o");
    let mut linker = Linker::new(&linked).map_err(|e| format!("libbpf linker: {e}"))?;
    for src in &sources {
        let obj = objs_dir
            .join(src.file_name().ok_or("bad source name")?)
            .with_extension("o");
        compile(&clang, src, &obj, &headers, arch)?;
        linker
            .add_file(&obj)
            .map_err(|e| format!("linking {}: {e}", obj.display()))?;
    }
    linker
        .link()
        .map_err(|e| format!("linking BPF objects: {e}"))?;

    SkeletonBuilder::new()
        .obj(&linked)
        .generate(out_dir.join("meshbpf.skel.rs"))
        .map_err(|e| format!("generating skeleton: {e:#}"))?;
    Ok(())
}

/// The `vmlinux/<arch>` directory that matches the target.
fn vmlinux_arch() -> Result<&'static str, String> {
    let target = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    match target.as_str() {
        "x86_64" => Ok("x86"),
        "aarch64" => Ok("arm64"),
        other => Err(format!(
            "no vmlinux.h for target architecture {other:?}; generate one on such a machine \
             with vmlinux/update.sh"
        )),
    }
    .and_then(|arch| {
        if Path::new("vmlinux").join(arch).join("vmlinux.h").exists() {
            Ok(arch)
        } else {
            Err(format!(
                "vmlinux/{arch}/vmlinux.h is missing; generate it on a {arch} machine with \
                 vmlinux/update.sh"
            ))
        }
    })
}

/// `MESHBPF_CLANG`, then `clang`, then versioned names, newest first; at least clang 16.
fn find_clang() -> Result<PathBuf, String> {
    let mut candidates: Vec<OsString> = Vec::new();
    if let Some(explicit) = env::var_os("MESHBPF_CLANG") {
        candidates.push(explicit);
    }
    candidates.push("clang".into());
    candidates.extend(
        (MIN_CLANG..=30)
            .rev()
            .map(|v| OsString::from(format!("clang-{v}"))),
    );

    let mut too_old = Vec::new();
    for candidate in candidates {
        let Ok(out) = Command::new(&candidate).arg("--version").output() else {
            continue;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        match clang_major(&text) {
            Some(major) if major >= MIN_CLANG => return Ok(PathBuf::from(candidate)),
            Some(major) => {
                too_old.push(format!("{} is clang {major}", candidate.to_string_lossy()))
            }
            None => continue,
        }
    }
    let found = if too_old.is_empty() {
        "no clang found".to_string()
    } else {
        too_old.join(", ")
    };
    Err(format!(
        "{found}; meshbpf needs clang >= {MIN_CLANG} to compile its BPF programs. \
         On Debian 12: apt-get install clang-19 (or set MESHBPF_CLANG=/path/to/clang)"
    ))
}

fn clang_major(version_text: &str) -> Option<u32> {
    let rest = &version_text[version_text.find("clang version ")? + "clang version ".len()..];
    rest.split('.').next()?.trim().parse().ok()
}

fn write_libbpf_headers(dir: &Path) -> Result<(), String> {
    let bpf = dir.join("bpf");
    fs::create_dir_all(&bpf).map_err(|e| e.to_string())?;
    for (name, contents) in libbpf_rs::libbpf_sys::API_HEADERS.iter() {
        fs::write(bpf.join(name), contents).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn compile(clang: &Path, src: &Path, obj: &Path, headers: &Path, arch: &str) -> Result<(), String> {
    let out = Command::new(clang)
        .args(["-g", "-O2", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg(format!("-Ivmlinux/{arch}"))
        .arg(format!("-I{BPF_DIR}"))
        .arg("-I")
        .arg(headers)
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj)
        .output()
        .map_err(|e| format!("running {}: {e}", clang.display()))?;
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        println!("cargo:warning={line}");
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed to compile {}",
            clang.display(),
            src.display()
        ))
    }
}
