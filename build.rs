//! Compiles every `src/bpf/*.bpf.c` (one per concern) with libbpf-cargo, links them into one
//! BPF object with libbpf's static linker (all but the per-pod `lookup.bpf.c`, an object and
//! a skeleton of its own), generates the libbpf-rs skeleton for it into
//! `OUT_DIR`, and derives from the object's BTF what Rust needs besides the skeleton's
//! types (`abi_gen.rs`: the counter names, the map names). The programs are also compiled,
//! not linked, for the other architecture whose `vmlinux.h` is committed, so that a type
//! one kernel lacks fails the build here rather than on that machine.

use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use libbpf_cargo::SkeletonBuilder;
use libbpf_rs::btf::types::Enum;
use libbpf_rs::btf::Btf;
use libbpf_rs::Linker;

const MIN_CLANG: u32 = 16;
const BPF_DIR: &str = "src/bpf";
/// The program loaded once per registered pod rather than once per node.
const PER_POD: &str = "lookup.bpf.c";
/// The benchmark's own program (benches/util/bpf_stats.rs loads it), compiled here because a
/// bench target has no build script of its own.
const BENCH_PROBE: &str = "benches/util/storage_probe.bpf.c";
/// The architectures with a committed `vmlinux/<arch>/vmlinux.h`, by Rust target name.
const ARCHES: [(&str, &str); 2] = [("x86_64", "x86"), ("aarch64", "arm64")];

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    let target = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let arch = vmlinux_arch(&target)?;
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
    for (_, dir) in ARCHES {
        for entry in fs::read_dir(format!("vmlinux/{dir}")).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    // The object that defines the maps goes first: the linker resolves the others' extern
    // map declarations against it. The per-pod sk_lookup program is an object of its own,
    // loaded once per pod (its pod's cookie set before load), with the same maps reused.
    sources.sort_by_key(|p| (!p.ends_with("maps.bpf.c"), p.clone()));
    let per_pod = Path::new(BPF_DIR).join(PER_POD);
    sources.retain(|p| *p != per_pod);

    let objs_dir = out_dir.join("bpf-objs");
    fs::create_dir_all(&objs_dir).map_err(|e| e.to_string())?;
    let linked = out_dir.join("meshbpf.bpf.o");
    let mut linker = Linker::new(&linked).map_err(|e| format!("libbpf linker: {e}"))?;
    for src in &sources {
        let obj = objs_dir.join(object_name(src)?);
        compile(&clang, src, &obj, arch)?;
        linker
            .add_file(&obj)
            .map_err(|e| format!("linking {}: {e}", obj.display()))?;
    }
    linker
        .link()
        .map_err(|e| format!("linking BPF objects: {e}"))?;
    let per_pod_obj = objs_dir.join(object_name(&per_pod)?);
    compile(&clang, &per_pod, &per_pod_obj, arch)?;
    for (_, other) in ARCHES.iter().filter(|(_, a)| *a != arch) {
        for src in sources.iter().chain([&per_pod]) {
            compile(
                &clang,
                src,
                &objs_dir.join(format!("{other}-check.o")),
                other,
            )
            .map_err(|e| format!("{e} (for {other}, against vmlinux/{other}/vmlinux.h)"))?;
        }
    }

    println!("cargo:rerun-if-changed={BENCH_PROBE}");
    compile(
        &clang,
        Path::new(BENCH_PROBE),
        &out_dir.join("storage_probe.bpf.o"),
        arch,
    )?;

    SkeletonBuilder::new()
        .obj(&linked)
        .generate(out_dir.join("meshbpf.skel.rs"))
        .map_err(|e| format!("generating skeleton: {e:#}"))?;
    SkeletonBuilder::new()
        .obj(&per_pod_obj)
        .generate(out_dir.join("lookup.skel.rs"))
        .map_err(|e| format!("generating the per-pod skeleton: {e:#}"))?;
    fs::write(out_dir.join("abi_gen.rs"), abi_gen(&linked)?).map_err(|e| e.to_string())?;
    Ok(())
}

/// `connect.bpf.c` → `connect.bpf.o`.
fn object_name(src: &Path) -> Result<String, String> {
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("bad source name")?;
    Ok(name.replace(".bpf.c", ".bpf.o"))
}

/// The `vmlinux/<arch>` directory that matches the target.
fn vmlinux_arch(target: &str) -> Result<&'static str, String> {
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
fn compile(clang: &Path, src: &Path, obj: &Path, arch: &str) -> Result<(), String> {
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

/// Rust source for what the skeleton does not generate: the counter names, from `enum
/// counter` (`CNT_CONNECT_REDIRECTED` → `connect_redirected`, in value order, up to
/// `CNT_MAX`), and the map names, from the object's `.maps` section.
fn abi_gen(linked: &Path) -> Result<String, String> {
    let btf = Btf::from_path(linked).map_err(|e| format!("reading BTF of {linked:?}: {e}"))?;
    let counter: Enum<'_> = btf
        .type_by_name("counter")
        .ok_or("meshbpf.h has no enum counter")?;
    let mut counters: Vec<(i64, String)> = counter
        .iter()
        .filter_map(|m| Some((m.value, m.name?.to_str()?.to_string())))
        .filter(|(_, name)| name != "CNT_MAX")
        .collect();
    counters.sort();
    let mut out = String::from("// Generated by build.rs from the BPF object's BTF.\n\n");
    let _ = writeln!(
        out,
        "/// The name of each counter, indexed by `enum counter` (meshbpf.h).\n\
         pub const COUNTER_NAMES: [&str; {}] = [",
        counters.len()
    );
    for (i, (value, name)) in counters.iter().enumerate() {
        if *value != i as i64 {
            return Err(format!("enum counter: {name} = {value}, expected {i}"));
        }
        let short = name
            .strip_prefix("CNT_")
            .ok_or(format!("{name}: no CNT_ prefix"))?;
        let _ = writeln!(out, "    {:?},", short.to_ascii_lowercase());
    }
    out.push_str("];\n\n");
    for (enum_name, constant) in [
        ("trace_reason", "TRACE_REASONS"),
        ("trace_hook", "TRACE_HOOKS"),
        ("rule_kind", "RULE_KINDS"),
    ] {
        let values: Enum<'_> = btf
            .type_by_name(enum_name)
            .ok_or(format!("meshbpf.h has no enum {enum_name}"))?;
        let values: Vec<String> = values.iter().map(|m| m.value.to_string()).collect();
        let _ = writeln!(
            out,
            "/// Every value of `enum {enum_name}` (meshbpf.h).\n\
             #[allow(dead_code)]\npub const {constant}: [u16; {}] = [{}];\n",
            values.len(),
            values.join(", ")
        );
    }

    let object = fs::read(linked).map_err(|e| e.to_string())?;
    let mut open = libbpf_rs::ObjectBuilder::default()
        .open_memory(&object)
        .map_err(|e| format!("opening {linked:?}: {e}"))?;
    let mut maps: Vec<String> = open
        .maps_mut()
        .map(|m| m.name().to_string_lossy().into_owned())
        .filter(|name| !name.contains('.'))
        .collect();
    maps.sort();
    out.push_str(
        "/// The name of every pinned map (meshbpf.h / common.bpf.h), one constant each.\n",
    );
    out.push_str("#[allow(dead_code)]\npub mod map {\n");
    for name in &maps {
        let _ = writeln!(
            out,
            "    pub const {}: &str = {name:?};",
            name.to_ascii_uppercase()
        );
    }
    let _ = writeln!(
        out,
        "    /// Every one of them.\n    pub const ALL: [&str; {}] = [{}];\n}}",
        maps.len(),
        maps.iter()
            .map(|n| n.to_ascii_uppercase())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(out)
}
