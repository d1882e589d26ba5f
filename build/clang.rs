//! Finding a clang new enough to compile the BPF programs.

use std::env;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

const MIN_CLANG: u32 = 16;

/// `MESHBPF_CLANG`, then `clang`, then versioned names, newest first; at least clang 16.
pub fn find_clang() -> Result<PathBuf, String> {
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
