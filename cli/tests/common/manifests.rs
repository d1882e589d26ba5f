//! The Kubernetes schemas' check of manifests, for tests/deploy.rs and tests/chart.rs.

use std::path::PathBuf;
use std::process::Command;

/// kubernetes-validate: `MESHBPF_KUBERNETES_VALIDATE`, the virtualenv scripts/deps.sh makes,
/// or PATH. Without it the test skips, except under CI, where it fails.
pub fn validator() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("MESHBPF_KUBERNETES_VALIDATE").map(PathBuf::from),
        Some(PathBuf::from("/opt/meshbpf-py/bin/kubernetes-validate")),
        Some(PathBuf::from("kubernetes-validate")),
    ];
    let found = candidates.into_iter().flatten().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubernetes-validate is missing and CI is set: run scripts/deps.sh"
        );
        super::skip("kubernetes-validate is missing (scripts/deps.sh installs it)");
    }
    found
}

/// The items of the first block list `key:` after `after` in a manifest's `text`, unquoted
/// scalars each.
#[track_caller]
pub fn list_after(text: &str, after: &str, key: &str) -> Vec<String> {
    let start = text.find(after).unwrap_or_else(|| panic!("no {after}"));
    text[start..]
        .lines()
        .skip_while(|l| l.trim() != format!("{key}:"))
        .skip(1)
        .take_while(|l| l.trim_start().starts_with("- "))
        .map(|l| l.trim_start()[2..].trim().to_string())
        .collect()
}
