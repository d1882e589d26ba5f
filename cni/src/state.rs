//! The state files that let `DEL` find what `ADD` registered, also once the netns is gone.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// What `ADD` registered for one attachment, kept until its `DEL`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct State {
    pub(super) container_id: String,
    pub(super) ifname: String,
    pub(super) netns: String,
    pub(super) netns_cookie: u64,
    pub(super) pin_dir: PathBuf,
}

impl State {
    pub(super) fn to_json(&self) -> Value {
        json!({
            "containerID": self.container_id,
            "ifname": self.ifname,
            "netns": self.netns,
            "netnsCookie": self.netns_cookie,
            "pinDir": self.pin_dir,
        })
    }

    pub(super) fn from_json(value: &Value) -> Option<State> {
        let text = |key: &str| Some(value.get(key)?.as_str()?.to_string());
        Some(State {
            container_id: text("containerID")?,
            ifname: text("ifname")?,
            netns: text("netns")?,
            netns_cookie: value.get("netnsCookie")?.as_u64()?,
            pin_dir: text("pinDir")?.into(),
        })
    }

    pub(super) fn read(path: &Path) -> Option<State> {
        let text = fs::read(path).ok()?;
        State::from_json(&serde_json::from_slice(&text).ok()?)
    }

    /// Writes the state file whole or not at all: a temporary file renamed into place.
    pub(super) fn write(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let dir = path.parent().unwrap_or(Path::new("/"));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(self.to_json().to_string().as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }
}

/// A file name made of `text`: letters, digits, `-` and `_` kept, every other byte as `%XX`
/// (so `.` separates, and no name is `.` or `..`).
pub(super) fn file_name_part(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The state directory of one network: `state_dir/<network name>`.
pub(super) fn network_state_dir(conf_state_dir: &Path, network: &str) -> PathBuf {
    conf_state_dir.join(match network {
        "" => "_".to_string(),
        name => file_name_part(name),
    })
}

/// The state file of one attachment.
pub(super) fn state_path(network_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    network_dir.join(format!(
        "{}.{}",
        file_name_part(container_id),
        file_name_part(ifname)
    ))
}

/// Every state file of one network, with its contents.
pub(super) fn states(network_dir: &Path) -> Vec<(PathBuf, State)> {
    let Ok(entries) = fs::read_dir(network_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.path(), State::read(&e.path())?)))
        .collect()
}
