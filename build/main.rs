//! Compiles every `src/bpf/*.bpf.c` (one per concern) with libbpf-cargo, links them into one
//! BPF object with libbpf's static linker (all but the per-pod `lookup.bpf.c`, an object and
//! a skeleton of its own), generates the libbpf-rs skeleton for it into
//! `OUT_DIR`, and derives from the object's BTF what Rust needs besides the skeleton's
//! types (`abi_gen.rs`: the counter names, the map names). The programs are also compiled,
//! not linked, for the other architecture whose `vmlinux.h` is committed, so that a type
//! one kernel lacks fails the build here rather than on that machine.

mod abi_gen;
mod bpf;
mod clang;

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use libbpf_cargo::SkeletonBuilder;
use libbpf_rs::Linker;

use abi_gen::abi_gen;
use bpf::{compile, object_name, vmlinux_arch, ARCHES};
use clang::find_clang;

const BPF_DIR: &str = "src/bpf";
/// The program loaded once per registered pod rather than once per node.
const PER_POD: &str = "lookup.bpf.c";
/// Where scripts/package.sh puts the compiled objects a published crate ships, so that a
/// build without clang (docs.rs) can still generate the skeleton.
const PREBUILT: &str = "bpf-prebuilt";
/// The benchmark's own program (benches/util/bpf_stats.rs loads it), compiled here because a
/// bench target has no build script of its own; only with feature `bench`, which the
/// benchmarks require (scripts/bench.sh passes it), so other builds skip it.
const BENCH_PROBE: &str = "benches/util/storage_probe.bpf.c";

fn main() {
    if let Err(err) = run() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    println!("cargo:rerun-if-env-changed=DOCS_RS");
    if env::var_os("DOCS_RS").is_some() {
        // docs.rs builds without clang: what rustdoc needs comes from the objects a release
        // ships (scripts/package.sh).
        return generate(
            &out_dir,
            &Path::new(PREBUILT).join("meshbpf.bpf.o"),
            &Path::new(PREBUILT).join("lookup.bpf.o"),
        )
        .map_err(|e| format!("{e} (DOCS_RS builds from {PREBUILT}/: run scripts/package.sh)"));
    }
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

    if env::var_os("CARGO_FEATURE_BENCH").is_some() {
        println!("cargo:rerun-if-changed={BENCH_PROBE}");
        compile(
            &clang,
            Path::new(BENCH_PROBE),
            &out_dir.join("storage_probe.bpf.o"),
            arch,
        )?;
    }

    generate(&out_dir, &linked, &per_pod_obj)
}

/// The skeletons and `abi_gen.rs`, from the linked object and the per-pod one.
fn generate(out_dir: &Path, linked: &Path, per_pod_obj: &Path) -> Result<(), String> {
    for obj in [linked, per_pod_obj] {
        if !obj.exists() {
            return Err(format!("{} is missing", obj.display()));
        }
    }
    SkeletonBuilder::new()
        .obj(linked)
        .generate(out_dir.join("meshbpf.skel.rs"))
        .map_err(|e| format!("generating skeleton: {e:#}"))?;
    SkeletonBuilder::new()
        .obj(per_pod_obj)
        .generate(out_dir.join("lookup.skel.rs"))
        .map_err(|e| format!("generating the per-pod skeleton: {e:#}"))?;
    fs::write(out_dir.join("abi_gen.rs"), abi_gen(linked)?).map_err(|e| e.to_string())?;
    Ok(())
}
