//! `meshbpf-cni`, a chained CNI plugin (CNI spec 1.0.0 and 1.1.0): it puts each pod the
//! container runtime creates in the mesh, with the settings of its conf entry and, on
//! Kubernetes, the pod's annotations.
//!
//! - `ADD` registers `CNI_NETNS` and prints `prevResult` back unchanged, byte for byte.
//! - `DEL` unregisters what `ADD` registered for (`CNI_CONTAINERID`, `CNI_IFNAME`), found
//!   in a small state file (`state_dir`, default [`DEFAULT_STATE_DIR`]), so it works when
//!   the netns is already gone; it succeeds when called twice or after a failed `ADD`.
//! - `CHECK` fails unless the pod is registered with the settings its conf gives.
//! - `STATUS` fails with code 50 while meshbpf is not attached.
//! - `GC` unregisters the attachments not in `cni.dev/valid-attachments`.
//!
//! Stdout carries only the result or the error JSON; logs go to stderr and, if the conf
//! names one, a log file: each line has the time, its level and the invocation's command,
//! container ID, netns and interface, as [`Log`] writes it. Different containers are handled in parallel safely: every pod's
//! map entries and state file are its own.

mod commands;
mod conf;
mod routes;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use meshbpf::PodOptions;

pub use conf::{Decision, PluginConf, Registration};
#[allow(unused_imports)]
use {commands::*, conf::*, routes::*, state::*};

/// The plugin's name: its binary and its conf entry's `type`.
pub const PLUGIN_TYPE: &str = "meshbpf-cni";
/// The CNI spec versions the plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Where `ADD` remembers what it registered unless the conf says `state_dir`. Under /run:
/// it lives as long as the pins and network namespaces it refers to (until reboot).
pub const DEFAULT_STATE_DIR: &str = "/run/meshbpf/cni";
/// The capability under which containerd (1.5+) and CRI-O (1.29+) deliver pod annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// Namespaces whose pods are never registered unless the conf says `exclude_namespaces`.
pub const DEFAULT_EXCLUDE_NAMESPACES: [&str; 1] = ["kube-system"];
/// The keys of the plugin's own conf, besides the per-pod options of [`PodOptions`].
pub const PLUGIN_KEYS: [&str; 4] = ["pin_dir", "state_dir", "exclude_namespaces", "log_file"];

/// Error codes: the spec's (below 100) and meshbpf-cni's own.
pub mod code {
    /// The conf's `cniVersion` is not one the plugin speaks.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// The conf has a key the plugin does not know.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// A `CNI_*` environment variable is missing or wrong.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// Reading input or writing state failed.
    pub const IO_FAILURE: u32 = 5;
    /// The conf is not a JSON object.
    pub const DECODE_FAILURE: u32 = 6;
    /// A conf value is wrong.
    pub const INVALID_CONFIG: u32 = 7;
    /// meshbpf is not attached yet (the node agent attaches it at start).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// `STATUS`: meshbpf is not attached, `ADD` cannot be served.
    pub const NOT_AVAILABLE: u32 = 50;
    /// A meshbpf operation failed (the details say which).
    pub const FAILED: u32 = 100;
    /// `CHECK`: the pod is not registered.
    pub const NOT_REGISTERED: u32 = 101;
    /// `CHECK`: the pod is registered with other settings than its conf gives.
    pub const OTHER_SETTINGS: u32 = 102;
}

/// A CNI error result: what the plugin prints on stdout when it fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorResult {
    /// The error code (see [`code`]).
    pub code: u32,
    /// A short message naming what is wrong.
    pub msg: String,
    /// More: the fix, or the underlying error.
    pub details: String,
}

impl ErrorResult {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        ErrorResult {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    fn config(msg: impl Into<String>) -> Self {
        let keys: Vec<String> = PLUGIN_KEYS
            .into_iter()
            .map(String::from)
            .chain(PodOptions::keys())
            .collect();
        ErrorResult::new(
            code::INVALID_CONFIG,
            msg,
            format!("meshbpf-cni takes: {}", keys.join(", ")),
        )
    }

    /// A pod annotation meshbpf and istio-cni both refuse: the conf is fine, the pod is not.
    fn annotation(msg: impl Into<String>) -> Self {
        ErrorResult::new(
            code::INVALID_CONFIG,
            msg,
            "the pod's annotation is wrong, not the plugin's conf (istio-cni refuses it too): \
             correct or remove it on the pod",
        )
    }
}

/// What one invocation prints on stdout, and whether it succeeded (exit status 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The result or the error JSON.
    pub stdout: Vec<u8>,
    /// Whether the command succeeded.
    pub ok: bool,
}

/// Log lines, to stderr (or whatever the caller gives) and to the conf's `log_file`, in the
/// agent's text format: `TIME LEVEL meshbpf-cni COMMAND container=… netns=… ifname=…:
/// MESSAGE`. A line is written whole with one `write`: parallel invocations appending to
/// one `log_file` never interleave within a line.
pub(crate) struct Log<'a> {
    pub(crate) out: &'a mut dyn Write,
    pub(crate) file: Option<File>,
    pub(crate) prefix: String,
}

impl Log<'_> {
    /// Logs what the plugin did or decided.
    pub(crate) fn line(&mut self, message: impl Display) {
        self.write("INFO", message);
    }

    /// Logs a failure the plugin reports (its error result) or works around.
    pub(crate) fn error(&mut self, message: impl Display) {
        self.write("ERROR", message);
    }

    fn write(&mut self, level: &str, message: impl Display) {
        let time = rfc3339(std::time::SystemTime::now());
        let line = format!("{time} {level:>5} {}: {message}\n", self.prefix);
        let _ = self.out.write_all(line.as_bytes());
        if let Some(file) = &mut self.file {
            let _ = file.write_all(line.as_bytes());
        }
    }

    pub(crate) fn open_file(&mut self, path: Option<&Path>) {
        let Some(path) = path else { return };
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => self.file = Some(file),
            Err(err) => self.error(format!("cannot open log_file {}: {err}", path.display())),
        }
    }
}

/// `time` in UTC as RFC 3339 with microseconds (`2026-12-08T00:00:00.000000Z`), as the
/// agent's log lines show it.
pub(crate) fn rfc3339(time: std::time::SystemTime) -> String {
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's days_from_civil, inverted),
    // in eras of 400 years that start on 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60,
        since.subsec_micros()
    )
}

/// One invocation's environment: the `CNI_*` variables.
pub type Environment = BTreeMap<String, String>;

/// Runs one plugin invocation: `CNI_COMMAND` and the rest from `env`, the conf from `stdin`;
/// log lines go to `log`. Never panics on bad input; every failure is an error result.
pub fn run(env: &Environment, stdin: &[u8], log: &mut dyn Write) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    let mut log = Log {
        out: log,
        file: None,
        prefix: format!(
            "{PLUGIN_TYPE} {command} container={} netns={} ifname={}",
            env.get("CNI_CONTAINERID")
                .filter(|v| !v.is_empty())
                .map_or("-", String::as_str),
            env.get("CNI_NETNS")
                .filter(|v| !v.is_empty())
                .map_or("-", String::as_str),
            env.get("CNI_IFNAME")
                .filter(|v| !v.is_empty())
                .map_or("-", String::as_str)
        ),
    };
    // Opened before the conf is checked, so that an error in the conf reaches the file too.
    log.open_file(lenient_log_file(stdin).as_deref());
    let result = match command {
        "VERSION" => Ok(version(stdin)),
        // DEL is best effort: it reads the conf leniently, as a bad conf must not keep a
        // pod from ever being deleted.
        "DEL" => del(env, stdin, &mut log).map(|()| Vec::new()),
        "ADD" | "CHECK" | "STATUS" | "GC" => {
            PluginConf::parse(stdin).and_then(|conf| match command {
                "ADD" => add(&conf, env, &mut log),
                "CHECK" => check(&conf, env).map(|()| Vec::new()),
                "STATUS" => status(&conf).map(|()| Vec::new()),
                _ => gc(&conf, &mut log).map(|()| Vec::new()),
            })
        }
        _ => Err(ErrorResult::new(
            code::INVALID_ENVIRONMENT,
            format!("CNI_COMMAND {command:?} is not a CNI command"),
            "give ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    };
    match result {
        Ok(stdout) => Outcome { stdout, ok: true },
        Err(err) => failure(&mut log, version_of(stdin), err),
    }
}

/// The conf's `log_file` if the conf is a JSON object naming an absolute path there, whatever
/// else is wrong with it.
pub(crate) fn lenient_log_file(stdin: &[u8]) -> Option<PathBuf> {
    let conf: Value = serde_json::from_slice(stdin).ok()?;
    let path = Path::new(conf.get("log_file")?.as_str()?);
    path.is_absolute().then(|| path.to_path_buf())
}

pub(crate) fn failure(log: &mut Log, cni_version: String, err: ErrorResult) -> Outcome {
    log.error(format!("error {}: {} ({})", err.code, err.msg, err.details));
    let body = json!({
        "cniVersion": cni_version,
        "code": err.code,
        "msg": err.msg,
        "details": err.details,
    });
    Outcome {
        stdout: body.to_string().into_bytes(),
        ok: false,
    }
}

/// The `cniVersion` of the input, for the output; the newest when there is none.
pub(crate) fn version_of(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| Some(v.get("cniVersion")?.as_str()?.to_string()))
        .unwrap_or_else(|| "1.1.0".into())
}

pub(crate) fn version(stdin: &[u8]) -> Vec<u8> {
    json!({"cniVersion": version_of(stdin), "supportedVersions": SUPPORTED_VERSIONS})
        .to_string()
        .into_bytes()
}
