//! `meshbpf agent`: the process of the node's DaemonSet.
//!
//! At start it attaches (or upgrades in place) the programs, installs `meshbpf-cni` into the
//! CNI bin dir, inserts its entry into the primary network configuration of the CNI conf
//! dir, and registers the pods that were running before (a sidecar found listening, see
//! [`discover`]). Then it keeps that entry in place (another CNI may rewrite the file:
//! watched with inotify), runs `gc` periodically, and serves `/livez`, `/healthz` and
//! `/metrics` ([`http`]). Its log lines are `tracing` events: the binary chooses where they go
//! and in which format.
//! Stopping it (SIGTERM, a restart) never detaches anything: capture goes on while it is
//! down. [`uninstall`] removes the plugin and its entry, then detaches.

pub mod conflist;
mod context;
pub mod discover;
mod http;
mod metrics;

use std::collections::BTreeSet;
use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde_json::Value;

use meshbpf::{Error, Result};
use meshbpf_cni::{PluginConf, ANNOTATIONS_CAPABILITY, PLUGIN_TYPE};

use crate::agent::context::Context;
use conflist::Insertion;
use meshbpf::AttachOptions;
use meshbpf::Netns;
use meshbpf::PodSettings;
use meshbpf::{Mesh, DEFAULT_PIN_DIR};

/// The agent's address for `/livez`, `/healthz` and `/metrics` unless told otherwise: the
/// node's loopback, which neither pods nor other hosts reach (the kubelet's probes do, with
/// `host: 127.0.0.1`). A Prometheus outside the node needs the node's IP instead.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9190";

/// What the agent does, and where.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The cgroup v2 directory to attach to (every pod's processes are below it).
    pub cgroup: PathBuf,
    /// The bpffs directory of the attachment.
    pub pin_dir: PathBuf,
    /// Node-wide attach options.
    pub attach: AttachOptions,
    /// The node's CNI bin dir, where `meshbpf-cni` is installed.
    pub cni_bin_dir: PathBuf,
    /// The node's CNI conf dir, whose primary network configuration gets the entry.
    pub cni_conf_dir: PathBuf,
    /// The `meshbpf-cni` binary to install.
    pub plugin_binary: PathBuf,
    /// The plugin's conf entry, as inserted into the conflist (see [`plugin_entry`]).
    pub plugin_entry: Value,
    /// Where to serve `/livez`, `/healthz` and `/metrics`; none: not served.
    pub listen: Option<SocketAddr>,
    /// How often to unregister pods whose network namespace is gone.
    pub gc_interval: Duration,
    /// Register the pods found running with a sidecar at start.
    pub discover: bool,
}

/// The plugin's conf entry from `text` (the ConfigMap's JSON; none: the defaults), checked
/// as the plugin will check it, with `type` and, unless given, `pin_dir` filled in. A
/// `pin_dir` other than the agent's is refused: the plugin would register pods into an
/// attachment nobody keeps.
pub fn plugin_entry(text: Option<&str>, pin_dir: &Path) -> Result<Value> {
    let bad = |what: String| Error::InvalidSetting(format!("plugin conf: {what}"));
    let mut entry: Value = match text {
        Some(text) => serde_json::from_str(text).map_err(|e| bad(format!("not JSON ({e})")))?,
        None => serde_json::json!({"capabilities": {ANNOTATIONS_CAPABILITY: true}}),
    };
    let object = entry
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    for key in ["prevResult", "runtimeConfig", "cni.dev/valid-attachments"] {
        if object.contains_key(key) {
            return Err(bad(format!("{key} is the runtime's to set; remove it")));
        }
    }
    match object.get("type").and_then(Value::as_str) {
        None => {
            object.insert("type".into(), PLUGIN_TYPE.into());
        }
        Some(PLUGIN_TYPE) => {}
        Some(other) => return Err(bad(format!("type {other:?}: give {PLUGIN_TYPE:?}"))),
    }
    let pinned = object
        .get("pin_dir")
        .and_then(Value::as_str)
        .map(PathBuf::from);
    match pinned {
        None if pin_dir != Path::new(DEFAULT_PIN_DIR) => {
            object.insert("pin_dir".into(), pin_dir.to_string_lossy().into());
        }
        Some(p) if p != pin_dir => {
            return Err(bad(format!(
                "pin_dir {} differs from the agent's --pin-dir {}; give the same directory",
                p.display(),
                pin_dir.display()
            )))
        }
        _ => {}
    }
    let bytes = entry.to_string();
    PluginConf::parse(bytes.as_bytes()).map_err(|e| bad(format!("{} ({})", e.msg, e.details)))?;
    Ok(entry)
}

/// The agent's counters and health, shared with the HTTP endpoint.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    conflist_writes: AtomicU64,
    plugin_installs: AtomicU64,
    gc_unregistered: AtomicU64,
    discovered: AtomicU64,
    http_evicted: AtomicU64,
    /// What keeps the node from being ready, by topic (plugin, conflist).
    health: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

impl Stats {
    fn set_problem(&self, topic: &'static str, problem: Option<String>) {
        if let Ok(mut health) = self.health.lock() {
            match problem {
                Some(p) => health.insert(topic, p),
                None => health.remove(topic),
            };
        }
    }

    /// What keeps the node from being ready; empty when it is.
    fn problems(&self) -> Vec<String> {
        self.health
            .lock()
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Runs the agent until `stop` is set; returns with every program still attached.
pub fn run(config: &AgentConfig, stop: &AtomicBool) -> Result<()> {
    let settings = entry_settings(&config.plugin_entry)?;
    // A pin directory another user made first (a bpffs mounted by hand is 1777) would stop
    // every attach for good: take the name back, their entry kept whole beside it.
    match meshbpf::reclaim_pin_dir(&config.pin_dir) {
        Ok(Some(aside)) => tracing::warn!(
            pin_dir = %config.pin_dir.display(),
            aside = %aside.display(),
            "{} had been made by another user before meshbpf; moved it, as it was, to {}",
            config.pin_dir.display(),
            aside.display()
        ),
        Ok(None) => {}
        // The attach below refuses the directory and says why.
        Err(err) => tracing::warn!(error = %err, "taking {} back", config.pin_dir.display()),
    }
    let mesh = match Mesh::attach_with(&config.cgroup, &config.pin_dir, &config.attach) {
        Ok(mesh) => mesh,
        Err(err @ Error::MissingKernelFeature { .. }) => return refuse(config, stop, err),
        Err(err) => return Err(err),
    };
    tracing::info!(
        cgroup = %config.cgroup.display(),
        pin_dir = %config.pin_dir.display(),
        layout = meshbpf::LAYOUT_VERSION,
        "attached"
    );
    let stats = Arc::new(Stats::default());
    // Bound first (a taken port fails the start), served once the first round is done.
    let listener = match config.listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).context(|| format!("listening on {addr} for /metrics"))?)
        }
        None => None,
    };
    fs::create_dir_all(&config.cni_conf_dir)
        .context(|| format!("creating {}", config.cni_conf_dir.display()))?;
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .context(|| "inotify_init".into())?;
    inotify
        .add_watch(&config.cni_conf_dir, WATCHED)
        .context(|| format!("watching {}", config.cni_conf_dir.display()))?;
    let mut installer = Installer::default();
    installer.reconcile(config, &stats);
    watch_linked_dirs(&inotify, config);
    if config.discover {
        register_running_pods(&mesh, &settings, &stats);
    }
    if let Some(listener) = listener {
        let bound = http::serve(listener, &config.pin_dir, stats.clone())?;
        // The address ends the message: the tests read it from there.
        tracing::info!("serving /livez, /healthz and /metrics on {bound}");
    }
    let mut next_gc = Instant::now() + config.gc_interval;
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, 200u16).unwrap_or(0);
        if ready > 0 {
            // Let a writer that makes several changes finish, then look once.
            std::thread::sleep(Duration::from_millis(50));
            while inotify.read_events().is_ok_and(|e| !e.is_empty()) {}
            installer.reconcile(config, &stats);
            watch_linked_dirs(&inotify, config);
        }
        if Instant::now() >= next_gc {
            next_gc = Instant::now() + config.gc_interval;
            match Mesh::open(&config.pin_dir).and_then(|m| m.gc()) {
                Ok(removed) => {
                    for pod in &removed {
                        tracing::info!(
                            netns_cookie = pod.netns_cookie,
                            "gc: unregistered a pod whose netns is gone"
                        );
                    }
                    stats
                        .gc_unregistered
                        .fetch_add(removed.len() as u64, Ordering::Relaxed);
                }
                Err(err) => tracing::warn!(error = %err, "gc failed"),
            }
            installer.reconcile(config, &stats);
        }
    }
    tracing::info!("stopping; the programs stay attached and pods stay registered");
    Ok(())
}

/// A kernel that lacks what meshbpf needs stays so until the node boots another: instead of
/// exiting (a restart loop, its reason only in old logs), the agent answers /healthz 503 with
/// the missing features, installs no plugin and touches no conflist (pods start as without
/// meshbpf, as before istio-cni's agent is ready), and exits with the refusal when stopped.
fn refuse(config: &AgentConfig, stop: &AtomicBool, err: Error) -> Result<()> {
    tracing::error!(error = %err, "not attaching; the node stays not ready");
    if let Some(addr) = config.listen {
        let listener =
            TcpListener::bind(addr).context(|| format!("listening on {addr} for /healthz"))?;
        let stats = Arc::new(Stats::default());
        stats.set_problem("kernel", Some(err.to_string()));
        let bound = http::serve(listener, &config.pin_dir, stats)?;
        tracing::info!("serving /livez, /healthz (not ready) and /metrics on {bound}");
    }
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(err)
}

/// The changes to a directory that may change the primary network configuration.
const WATCHED: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_CREATE)
    .union(AddWatchFlags::IN_DELETE);

/// Watches the directories that network configurations which are symbolic links lead
/// into: the primary CNI rewrites its file there (watching one twice is a no-op).
fn watch_linked_dirs(inotify: &Inotify, config: &AgentConfig) {
    for dir in conflist::linked_dirs(&config.cni_conf_dir) {
        if let Err(err) = inotify.add_watch(&dir, WATCHED) {
            tracing::warn!(error = %err, "watching {}", dir.display());
        }
    }
}

/// The settings the plugin's conf entry gives (for pods found running).
fn entry_settings(entry: &Value) -> Result<PodSettings> {
    let conf = PluginConf::parse(entry.to_string().as_bytes())
        .map_err(|e| Error::InvalidSetting(format!("plugin conf: {}", e.msg)))?;
    conf.options.settings(None)
}

/// Registers, with the conf's settings, every pod found with a sidecar listening that is not
/// registered yet; a pod registered already (by the plugin, with its annotations) keeps its
/// settings. The host's own namespace is never registered.
fn register_running_pods(mesh: &Mesh, settings: &PodSettings, stats: &Stats) {
    let registered: BTreeSet<u64> = match mesh.pods() {
        Ok(pods) => pods.iter().map(|p| p.netns_cookie).collect(),
        Err(err) => return tracing::warn!(error = %err, "discovery: listing the pods"),
    };
    for sidecar in discover::find_sidecars(&settings.proxy_uids, settings.outbound_port) {
        let path = sidecar.netns_path();
        let netns = match Netns::open(&path) {
            Ok(netns) => netns,
            Err(err) => {
                tracing::warn!(error = %err, "discovery: opening {}", path.display());
                continue;
            }
        };
        if netns.is_host().unwrap_or(true) || registered.contains(&netns.cookie()) {
            continue;
        }
        match mesh.register_netns(&path, settings) {
            Ok(pod) => {
                stats.discovered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    netns_inode = sidecar.netns_inode,
                    pid = sidecar.pid,
                    netns_cookie = pod.netns_cookie,
                    "registered running pod"
                );
            }
            Err(err) => tracing::warn!(
                error = %err,
                "discovery: registering {}",
                path.display()
            ),
        }
    }
}

/// Keeps the plugin binary and its conflist entry in place.
#[derive(Default)]
struct Installer {
    /// The installed binary as last written: (length, modification time).
    installed: Option<(u64, std::time::SystemTime)>,
}

impl Installer {
    fn reconcile(&mut self, config: &AgentConfig, stats: &Stats) {
        let plugin = self.install_binary(config, stats);
        stats.set_problem("plugin", plugin.err().map(|e| e.to_string()));
        let inserted = conflist::insert(&config.cni_conf_dir, &config.plugin_entry);
        let problem = match inserted {
            Ok(Insertion::NoPrimary) => Some(format!(
                "no network configuration in {} yet (waiting for the primary CNI plugin)",
                config.cni_conf_dir.display()
            )),
            Ok(Insertion::Unchanged(_)) => None,
            Ok(Insertion::Written(path)) => {
                stats.conflist_writes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(file = %path.display(), "inserted {PLUGIN_TYPE}");
                None
            }
            Ok(Insertion::Wrapped { from, to }) => {
                stats.conflist_writes.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    from = %from.display(),
                    to = %to.display(),
                    "wrapped the primary's .conf into a .conflist with {PLUGIN_TYPE}"
                );
                None
            }
            Err(err) => Some(err.to_string()),
        };
        if let Some(problem) = &problem {
            tracing::warn!("{problem}");
        }
        stats.set_problem("conflist", problem);
    }

    /// Copies the plugin binary into the bin dir unless the copy there is the one this
    /// agent wrote last (by length and modification time).
    fn install_binary(&mut self, config: &AgentConfig, stats: &Stats) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let target = config.cni_bin_dir.join(PLUGIN_TYPE);
        let stamp = |p: &Path| {
            fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)))
        };
        if self.installed.is_some() && stamp(&target) == self.installed {
            return Ok(());
        }
        fs::create_dir_all(&config.cni_bin_dir)
            .context(|| format!("creating {}", config.cni_bin_dir.display()))?;
        // Copied beside it, then renamed: a runtime running the old binary keeps it.
        let tmp = config.cni_bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
        let copy = || -> std::io::Result<()> {
            fs::copy(&config.plugin_binary, &tmp)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
            fs::rename(&tmp, &target)
        };
        copy().context(|| {
            let _ = fs::remove_file(&tmp);
            format!(
                "installing {} as {}",
                config.plugin_binary.display(),
                target.display()
            )
        })?;
        self.installed = stamp(&target);
        stats.plugin_installs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(file = %target.display(), "installed {PLUGIN_TYPE}");
        Ok(())
    }
}

/// Removes the plugin's entry from every network configuration of the conf dir, the
/// plugin binary, and the plugin's state; then detaches every program.
pub fn uninstall(config: &AgentConfig) -> Result<()> {
    for path in conflist::remove(&config.cni_conf_dir)? {
        tracing::info!(file = %path.display(), "removed {PLUGIN_TYPE}'s entry");
    }
    let binary = config.cni_bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&binary) {
        Ok(()) => tracing::info!(file = %binary.display(), "removed {PLUGIN_TYPE}"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).context(|| format!("removing {}", binary.display())),
    }
    if let Ok(conf) = PluginConf::parse(config.plugin_entry.to_string().as_bytes()) {
        match fs::remove_dir_all(&conf.state_dir) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(err).context(|| format!("removing {}", conf.state_dir.display()))
            }
            _ => {}
        }
    }
    if meshbpf::detach(&config.pin_dir)? {
        tracing::info!(
            pin_dir = %config.pin_dir.display(),
            "detached; removed every pin"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_entry_gets_its_type_and_the_agent_s_pin_dir() {
        let e = plugin_entry(None, Path::new("/sys/fs/bpf/other")).unwrap();
        assert_eq!(e["type"], PLUGIN_TYPE);
        assert_eq!(e["pin_dir"], "/sys/fs/bpf/other");
        assert_eq!(e["capabilities"][ANNOTATIONS_CAPABILITY], true);
        let e = plugin_entry(Some(r#"{"mesh":"linkerd"}"#), Path::new(DEFAULT_PIN_DIR)).unwrap();
        assert_eq!(
            e,
            serde_json::json!({"mesh": "linkerd", "type": PLUGIN_TYPE})
        );
    }

    #[test]
    fn a_bad_plugin_entry_is_refused_before_anything_is_installed() {
        for (text, named) in [
            (
                r#"{"pin_dir":"/sys/fs/bpf/x"}"#,
                "differs from the agent's --pin-dir",
            ),
            (r#"{"type":"calico"}"#, "calico"),
            (r#"{"outbound_port":0}"#, "outbound_port"),
            (r#"{"colour":"blue"}"#, "colour"),
            (r#"{"prevResult":{}}"#, "prevResult"),
            ("[]", "not a JSON object"),
        ] {
            let err = plugin_entry(Some(text), Path::new(DEFAULT_PIN_DIR))
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
    }
}
