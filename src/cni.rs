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
//! names one, a log file. Different containers are handled in parallel safely: every pod's
//! map entries and state file are its own.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::cidr::Cidr;
use crate::error::Error;
use crate::mesh::{Mesh, DEFAULT_PIN_DIR};
use crate::netns::Netns;
use crate::options::PodOptions;
use crate::presets::{read_istio_annotations, IstioAnnotations};
use crate::settings::PodSettings;

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
}

/// What one invocation prints on stdout, and whether it succeeded (exit status 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The result or the error JSON.
    pub stdout: Vec<u8>,
    /// Whether the command succeeded.
    pub ok: bool,
}

/// A request's conf: the plugin's conf entry with what the runtime inserted.
#[derive(Clone, Debug)]
pub struct PluginConf {
    /// The protocol version in use.
    pub cni_version: String,
    /// The network's name.
    pub name: String,
    /// The bpffs directory of the attachment (default [`DEFAULT_PIN_DIR`]).
    pub pin_dir: PathBuf,
    /// Where `ADD` remembers what it registered (default [`DEFAULT_STATE_DIR`]).
    pub state_dir: PathBuf,
    /// Pods of these Kubernetes namespaces (`K8S_POD_NAMESPACE`) are never registered.
    pub exclude_namespaces: Vec<String>,
    /// A file the plugin appends its log lines to, besides stderr.
    pub log_file: Option<PathBuf>,
    /// The per-pod settings of this network's pods.
    pub options: PodOptions,
    /// The pod's annotations, when the runtime delivered them in `runtimeConfig`.
    pub annotations: Option<BTreeMap<String, String>>,
    prev_result: Option<Box<RawValue>>,
    valid_attachments: Option<BTreeSet<(String, String)>>,
}

impl PluginConf {
    /// Parses a request's conf (the plugin's stdin), or a conf entry as a conflist holds it;
    /// an unknown key or a bad value is refused by name.
    pub fn parse(bytes: &[u8]) -> Result<PluginConf, ErrorResult> {
        let fields: BTreeMap<String, Box<RawValue>> =
            serde_json::from_slice(bytes).map_err(|err| {
                ErrorResult::new(
                    code::DECODE_FAILURE,
                    "the network configuration is not a JSON object",
                    err.to_string(),
                )
            })?;
        let mut conf = PluginConf {
            cni_version: "1.1.0".into(),
            name: String::new(),
            pin_dir: DEFAULT_PIN_DIR.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            exclude_namespaces: DEFAULT_EXCLUDE_NAMESPACES.map(String::from).to_vec(),
            log_file: None,
            options: PodOptions::default(),
            annotations: None,
            prev_result: None,
            valid_attachments: None,
        };
        for (key, raw) in fields {
            if key == "prevResult" {
                if !raw.get().trim_start().starts_with('{') {
                    return Err(ErrorResult::config("prevResult: not a JSON object"));
                }
                conf.prev_result = Some(raw);
                continue;
            }
            let value: Value = serde_json::from_str(raw.get()).map_err(|err| {
                ErrorResult::new(code::DECODE_FAILURE, format!("{key}: {err}"), "")
            })?;
            conf.set(&key, value)?;
        }
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(ErrorResult::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {:?} is not supported", conf.cni_version),
                format!("meshbpf-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        conf.options
            .settings(None)
            .map_err(|err| ErrorResult::config(err.to_string()))?;
        Ok(conf)
    }

    fn set(&mut self, key: &str, value: Value) -> Result<(), ErrorResult> {
        let bad = |what: &str| ErrorResult::config(format!("{key}: {value}: {what}"));
        let path = |value: &Value| match value.as_str() {
            Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
            _ => Err(bad("give an absolute path")),
        };
        match key {
            "cniVersion" => {
                self.cni_version = value
                    .as_str()
                    .ok_or_else(|| bad("give a version string"))?
                    .into()
            }
            "name" => self.name = value.as_str().ok_or_else(|| bad("give a string"))?.into(),
            // The protocol's own keys, and those of the conflist around the entry.
            "type" | "cniVersions" | "capabilities" | "args" => {}
            "pin_dir" => self.pin_dir = path(&value)?,
            "state_dir" => self.state_dir = path(&value)?,
            "log_file" => self.log_file = Some(path(&value)?),
            "exclude_namespaces" => {
                self.exclude_namespaces = value
                    .as_array()
                    .and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect())
                    .ok_or_else(|| bad("give a list of namespace names"))?
            }
            "runtimeConfig" => {
                let Some(annotations) = value.get(ANNOTATIONS_CAPABILITY) else {
                    return Ok(());
                };
                // containerd (1.6 at least) sends null for a pod without annotations.
                let empty = serde_json::Map::new();
                let map = match annotations {
                    Value::Null => &empty,
                    other => other
                        .as_object()
                        .ok_or_else(|| bad("pod annotations: give a JSON object or null"))?,
                };
                self.annotations = Some(
                    map.iter()
                        .map(|(k, v)| {
                            let text = v.as_str().map_or_else(|| v.to_string(), String::from);
                            (k.clone(), text)
                        })
                        .collect(),
                );
            }
            "cni.dev/valid-attachments" => {
                let attachment = |v: &Value| {
                    Some((
                        v.get("containerID")?.as_str()?.to_string(),
                        v.get("ifname")?.as_str()?.to_string(),
                    ))
                };
                self.valid_attachments = Some(
                    value
                        .as_array()
                        .and_then(|a| a.iter().map(attachment).collect())
                        .ok_or_else(|| bad("give a list of {containerID, ifname}"))?,
                );
            }
            key if key.starts_with("cni.dev/") => {}
            _ => {
                let known = self
                    .options
                    .set(key, &value)
                    .map_err(|err| ErrorResult::config(err.to_string()))?;
                if !known {
                    let mut err =
                        ErrorResult::config(format!("unsupported field {key:?}: {value}"));
                    err.code = code::UNSUPPORTED_FIELD;
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    /// Whether a pod is registered, and with which settings: skipped when its Kubernetes
    /// namespace is excluded, or when the runtime delivered its annotations (`null`: none)
    /// and they show no injected sidecar; otherwise the conf's settings with the pod's
    /// Istio annotations applied over them, read as istio-cni reads them.
    pub fn decide(&self, cni_args: Option<&str>) -> Result<Decision, ErrorResult> {
        if let Some(namespace) = cni_arg(cni_args, "K8S_POD_NAMESPACE") {
            if self.exclude_namespaces.iter().any(|n| n == namespace) {
                return Ok(Decision::Skip(format!(
                    "namespace {namespace} is in exclude_namespaces"
                )));
            }
        }
        let settings = self
            .options
            .settings(None)
            .map_err(|err| ErrorResult::config(err.to_string()))?;
        let Some(annotations) = &self.annotations else {
            return Ok(Decision::Register(Box::new(IstioAnnotations::from(
                settings,
            ))));
        };
        if !annotations.contains_key("sidecar.istio.io/status") {
            return Ok(Decision::Skip(
                "no sidecar injected (no sidecar.istio.io/status annotation)".into(),
            ));
        }
        if annotations
            .get("sidecar.istio.io/inject")
            .is_some_and(|v| v.eq_ignore_ascii_case("false"))
        {
            return Ok(Decision::Skip(
                "annotation sidecar.istio.io/inject is \"false\"".into(),
            ));
        }
        read_istio_annotations(settings, annotations)
            .and_then(|read| read.settings.validate().map(|()| read))
            .map(|read| Decision::Register(Box::new(read)))
            .map_err(|err| ErrorResult::config(format!("pod annotations: {err}")))
    }
}

/// What the conf and the pod's annotations say about a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Leave the pod alone, for this reason.
    Skip(String),
    /// Register it.
    Register(Box<Registration>),
}

/// The settings of a pod the plugin registers, before its network namespace is looked at,
/// and what its annotations named that only the namespace or the log can answer.
pub type Registration = IstioAnnotations;

/// The settings to register the pod in `netns` with: the [`Registration`]'s, with outbound to
/// what its excluded interfaces reach not captured; and the lines to log, saying what was
/// read and what was left alone.
fn settings_in(
    registration: &Registration,
    netns: &Netns,
) -> Result<(PodSettings, Vec<String>), ErrorResult> {
    let mut settings = registration.settings.clone();
    let mut notes = Vec::new();
    let (unknown, others) = (&registration.unknown_traffic_keys, &registration.other_keys);
    if !unknown.is_empty() {
        notes.push(format!(
            "ignored {} traffic annotation(s) neither istio-cni nor meshbpf reads: {}",
            unknown.len(),
            unknown.join(", ")
        ));
    }
    if !others.is_empty() {
        notes.push(format!(
            "left alone {} annotation(s) that are not Istio's traffic settings: {}",
            others.len(),
            others.join(", ")
        ));
    }
    if !registration.virtual_interfaces.is_empty() {
        notes.push(format!(
            "kubevirtInterfaces {}: the VM's traffic is forwarded through the pod, not \
             made by its sockets, so it is not captured (istio-iptables redirects what \
             arrives there to the sidecar as outbound); the pod's own connections are \
             captured as usual",
            registration.virtual_interfaces.join(",")
        ));
    }
    if registration.exclude_interfaces.is_empty() {
        return Ok((settings, notes));
    }
    let routed = routed_out_of(netns, &registration.exclude_interfaces).map_err(|err| {
        ErrorResult::new(
            code::FAILED,
            format!(
                "reading the routes of {} in {}",
                registration.exclude_interfaces.join(","),
                netns.path().display()
            ),
            err.to_string(),
        )
    })?;
    if !routed.missing.is_empty() {
        notes.push(format!(
            "excludeInterfaces: {} not in the pod at ADD: nothing excluded for it",
            routed.missing.join(",")
        ));
    }
    if !routed.cidrs.is_empty() {
        notes.push(format!(
            "excludeInterfaces {}: outbound to {} is not captured",
            registration.exclude_interfaces.join(","),
            routed
                .cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    settings.exclude_outbound_cidrs.extend(routed.cidrs);
    settings.validate().map_err(|err| {
        ErrorResult::config(format!(
            "pod annotations: traffic.sidecar.istio.io/excludeInterfaces: {err}"
        ))
    })?;
    Ok((settings, notes))
}

/// What a pod routes out of some of its interfaces.
#[derive(Debug, Default)]
struct Routed {
    /// The destinations: the interfaces' own addresses, and every prefix the main routing
    /// table sends out of them, less the longer prefixes it sends elsewhere.
    cidrs: BTreeSet<Cidr>,
    /// The names no interface of the pod has.
    missing: Vec<String>,
}

/// What `netns` routes out of the interfaces `names`, as its main table says now (the
/// destinations a socket's connect reaches through them: what istio-iptables' `OUTPUT -o
/// IFACE -j RETURN` leaves alone).
fn routed_out_of(netns: &Netns, names: &[String]) -> std::io::Result<Routed> {
    let fd = netns.file().try_clone()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> std::io::Result<Routed> {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let mut routed = Routed::default();
                let mut indexes = BTreeSet::new();
                for name in names {
                    match nix::net::if_::if_nametoindex(name.as_str()) {
                        Ok(index) => drop(indexes.insert(index)),
                        Err(nix::errno::Errno::ENODEV) => routed.missing.push(name.clone()),
                        Err(err) => return Err(err.into()),
                    }
                }
                for ifa in nix::ifaddrs::getifaddrs()? {
                    let Some(addr) = ifa.address.filter(|_| names.contains(&ifa.interface_name))
                    else {
                        continue;
                    };
                    let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                        (Some(v4), _) => IpAddr::V4(v4.ip()),
                        (_, Some(v6)) if !is_link_local(v6.ip()) => IpAddr::V6(v6.ip()),
                        _ => continue,
                    };
                    routed
                        .cidrs
                        .extend(cidr(ip, if ip.is_ipv4() { 32 } else { 128 }));
                }
                let mut routes = main_table_routes(nix::libc::AF_INET as u8)?;
                routes.extend(main_table_routes(nix::libc::AF_INET6 as u8)?);
                let (out, elsewhere): (Vec<_>, Vec<_>) = routes
                    .into_iter()
                    .partition(|(_, oif)| indexes.contains(oif));
                let elsewhere: Vec<Cidr> = elsewhere.into_iter().map(|(c, _)| c).collect();
                for (prefix, _) in out {
                    routed.cidrs.extend(without(prefix, &elsewhere));
                }
                Ok(routed)
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("route thread panicked")))
    })
}

fn is_link_local(ip: std::net::Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// `ip`/`prefix` as a prefix (host bits cleared).
fn cidr(ip: IpAddr, prefix: u8) -> Option<Cidr> {
    format!("{ip}/{prefix}").parse().ok()
}

/// `prefix` less every prefix of `holes` inside it (a hole as long or longer): the longest
/// match decides a route, so what a longer prefix sends elsewhere is not routed out here.
fn without(prefix: Cidr, holes: &[Cidr]) -> Vec<Cidr> {
    let inside: Vec<Cidr> = holes
        .iter()
        .copied()
        .filter(|h| h.prefix() >= prefix.prefix() && prefix.contains(h.addr()))
        .collect();
    if inside.is_empty() {
        return vec![prefix];
    }
    if inside.iter().any(|h| h.prefix() == prefix.prefix()) {
        return Vec::new();
    }
    let bits = if prefix.addr().is_ipv4() { 32 } else { 128 };
    let low = match prefix.addr() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let high = low | 1u128 << (bits - 1 - prefix.prefix());
    [low, high]
        .into_iter()
        .filter_map(|half| {
            let ip = match prefix.addr() {
                IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(half as u32)),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(half)),
            };
            cidr(ip, prefix.prefix() + 1)
        })
        .flat_map(|half| without(half, &inside))
        .collect()
}

/// The unicast routes of the calling thread's network namespace's main table in `family`
/// (AF_INET or AF_INET6), each with its output interface: one RTM_GETROUTE dump over
/// rtnetlink (linux/rtnetlink.h). Multipath routes (no single RTA_OIF) are left out; IPv6
/// link-local ones too (every interface has fe80::/64, and a connect to one names its
/// interface).
fn main_table_routes(family: u8) -> std::io::Result<Vec<(Cidr, u32)>> {
    use nix::libc;
    use nix::sys::socket::{recv, send, socket, MsgFlags, SockFlag, SockProtocol, SockType};
    use std::os::fd::AsRawFd;
    const RTM_GETROUTE: u16 = 26;
    const RTM_NEWROUTE: u16 = 24;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_TABLE: u16 = 15;
    const RTN_UNICAST: u8 = 1;
    const RT_TABLE_MAIN: u32 = 254;
    // nlmsghdr (16) + rtmsg (12).
    let mut msg = Vec::with_capacity(28);
    msg.extend_from_slice(&28u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // the kernel
    msg.extend_from_slice(&[family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let sock = socket(
        nix::sys::socket::AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    send(sock.as_raw_fd(), &msg, MsgFlags::empty())?;
    let u16_at = |b: &[u8], at: usize| b.get(at..at + 2).map(|w| u16::from_ne_bytes([w[0], w[1]]));
    let u32_at = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
    };
    let mut routes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(std::io::Error::other(
                "rtnetlink closed before the dump ended",
            ));
        }
        let mut at = 0;
        while at + 16 <= n {
            let (Some(len), Some(kind)) = (u32_at(&buf, at), u16_at(&buf, at + 4)) else {
                break;
            };
            let len = len as usize;
            if len < 16 || at + len > n {
                return Err(std::io::Error::other("truncated rtnetlink message"));
            }
            let body = &buf[at + 16..at + len];
            at += (len + 3) & !3;
            match kind {
                k if k == libc::NLMSG_DONE as u16 => return Ok(routes),
                k if k == libc::NLMSG_ERROR as u16 => {
                    let errno = u32_at(body, 0).map_or(0, |e| e as i32);
                    return Err(std::io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWROUTE if body.len() >= 12 && body[7] == RTN_UNICAST => {}
                _ => continue,
            }
            let (dst_len, mut table) = (body[1], u32::from(body[4]));
            let (mut dst, mut oif) = (None, None);
            let mut a = 12;
            while a + 4 <= body.len() {
                let (Some(alen), Some(atype)) = (u16_at(body, a), u16_at(body, a + 2)) else {
                    break;
                };
                let alen = alen as usize;
                if alen < 4 || a + alen > body.len() {
                    break;
                }
                let data = &body[a + 4..a + alen];
                match atype {
                    RTA_DST => dst = Some(data.to_vec()),
                    RTA_OIF => oif = u32_at(data, 0),
                    RTA_TABLE => table = u32_at(data, 0).unwrap_or(table),
                    _ => {}
                }
                a += (alen + 3) & !3;
            }
            let ip = match (family as i32, dst.as_deref()) {
                (libc::AF_INET, Some(&[a, b, c, d])) => IpAddr::from([a, b, c, d]),
                (libc::AF_INET, None) => IpAddr::from([0u8; 4]),
                (libc::AF_INET6, Some(d)) => match <[u8; 16]>::try_from(d) {
                    Ok(octets) => IpAddr::from(octets),
                    Err(_) => continue,
                },
                (libc::AF_INET6, None) => IpAddr::from([0u8; 16]),
                _ => continue,
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if is_link_local(v6));
            if let (RT_TABLE_MAIN, false, Some(oif), Some(prefix)) =
                (table, link_local, oif, cidr(ip, dst_len))
            {
                routes.push((prefix, oif));
            }
        }
    }
}

/// The value of `key` in `CNI_ARGS` (`K1=V1;K2=V2`).
fn cni_arg<'a>(args: Option<&'a str>, key: &str) -> Option<&'a str> {
    args?
        .split(';')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim())
}

/// What `ADD` registered for one attachment, kept until its `DEL`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    container_id: String,
    ifname: String,
    netns: String,
    netns_cookie: u64,
    pin_dir: PathBuf,
}

impl State {
    fn to_json(&self) -> Value {
        json!({
            "containerID": self.container_id,
            "ifname": self.ifname,
            "netns": self.netns,
            "netnsCookie": self.netns_cookie,
            "pinDir": self.pin_dir,
        })
    }

    fn from_json(value: &Value) -> Option<State> {
        let text = |key: &str| Some(value.get(key)?.as_str()?.to_string());
        Some(State {
            container_id: text("containerID")?,
            ifname: text("ifname")?,
            netns: text("netns")?,
            netns_cookie: value.get("netnsCookie")?.as_u64()?,
            pin_dir: text("pinDir")?.into(),
        })
    }

    fn read(path: &Path) -> Option<State> {
        let text = fs::read(path).ok()?;
        State::from_json(&serde_json::from_slice(&text).ok()?)
    }

    /// Writes the state file whole or not at all: a temporary file renamed into place.
    fn write(&self, path: &Path) -> std::io::Result<()> {
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
fn file_name_part(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// The state directory of one network: `state_dir/<network name>`.
fn network_state_dir(conf_state_dir: &Path, network: &str) -> PathBuf {
    conf_state_dir.join(match network {
        "" => "_".to_string(),
        name => file_name_part(name),
    })
}

/// The state file of one attachment.
fn state_path(network_dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    network_dir.join(format!(
        "{}.{}",
        file_name_part(container_id),
        file_name_part(ifname)
    ))
}

/// Every state file of one network, with its contents.
fn states(network_dir: &Path) -> Vec<(PathBuf, State)> {
    let Ok(entries) = fs::read_dir(network_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.path(), State::read(&e.path())?)))
        .collect()
}

/// Log lines, to stderr (or whatever the caller gives) and to the conf's `log_file`.
struct Log<'a> {
    out: &'a mut dyn Write,
    file: Option<File>,
    prefix: String,
}

impl Log<'_> {
    fn line(&mut self, message: impl Display) {
        let line = format!("{}: {message}\n", self.prefix);
        let _ = self.out.write_all(line.as_bytes());
        if let Some(file) = &mut self.file {
            let _ = file.write_all(line.as_bytes());
        }
    }

    fn open_file(&mut self, path: Option<&Path>) {
        let Some(path) = path else { return };
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => self.file = Some(file),
            Err(err) => self.line(format!("cannot open log_file {}: {err}", path.display())),
        }
    }
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
            "{PLUGIN_TYPE} {command} container={} ifname={}",
            env.get("CNI_CONTAINERID").map_or("-", String::as_str),
            env.get("CNI_IFNAME").map_or("-", String::as_str)
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
fn lenient_log_file(stdin: &[u8]) -> Option<PathBuf> {
    let conf: Value = serde_json::from_slice(stdin).ok()?;
    let path = Path::new(conf.get("log_file")?.as_str()?);
    path.is_absolute().then(|| path.to_path_buf())
}

fn failure(log: &mut Log, cni_version: String, err: ErrorResult) -> Outcome {
    log.line(format!("error {}: {} ({})", err.code, err.msg, err.details));
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
fn version_of(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| Some(v.get("cniVersion")?.as_str()?.to_string()))
        .unwrap_or_else(|| "1.1.0".into())
}

fn version(stdin: &[u8]) -> Vec<u8> {
    json!({"cniVersion": version_of(stdin), "supportedVersions": SUPPORTED_VERSIONS})
        .to_string()
        .into_bytes()
}

/// The attachment named by `CNI_CONTAINERID` and `CNI_IFNAME` (and `CNI_NETNS`, when
/// `netns` is required); the error names every variable missing.
fn attachment(env: &Environment, netns: bool) -> Result<[&str; 3], ErrorResult> {
    let mut names = vec!["CNI_CONTAINERID", "CNI_IFNAME"];
    if netns {
        names.push("CNI_NETNS");
    }
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| env.get(*n).is_none_or(|v| v.is_empty()))
        .collect();
    if !missing.is_empty() {
        return Err(ErrorResult::new(
            code::INVALID_ENVIRONMENT,
            format!("{} not set", missing.join(", ")),
            "the container runtime sets them for ADD, DEL and CHECK",
        ));
    }
    let get = |n: &str| env.get(n).map_or("", String::as_str);
    Ok([get("CNI_CONTAINERID"), get("CNI_IFNAME"), get("CNI_NETNS")])
}

/// A library error as a CNI error result.
fn mesh_error(err: Error, pin_dir: &Path) -> ErrorResult {
    let text = err.to_string();
    match err {
        Error::NotAttached { .. } => ErrorResult::new(
            code::TRY_AGAIN_LATER,
            format!("meshbpf is not attached under {} yet", pin_dir.display()),
            format!("{text} (the node agent, `meshbpf agent`, attaches it when it starts)"),
        ),
        Error::BpffsNotMounted { .. } => {
            ErrorResult::config(format!("pin_dir {}: {text}", pin_dir.display()))
        }
        Error::NetnsNotFound { .. } | Error::NotANetns { .. } | Error::HostNetns { .. } => {
            ErrorResult::new(code::INVALID_ENVIRONMENT, format!("CNI_NETNS: {text}"), "")
        }
        Error::InvalidSetting(_) => ErrorResult::config(text),
        _ => ErrorResult::new(code::FAILED, "meshbpf failed", text),
    }
}

fn prev_result(conf: &PluginConf) -> Result<&RawValue, ErrorResult> {
    conf.prev_result.as_deref().ok_or_else(|| {
        ErrorResult::config(
            "no prevResult: meshbpf-cni is a chained plugin; list it after the interface \
             plugin (bridge, calico, cilium, ...) in the conflist's plugins",
        )
    })
}

fn add(conf: &PluginConf, env: &Environment, log: &mut Log) -> Result<Vec<u8>, ErrorResult> {
    let [container_id, ifname, netns] = attachment(env, true)?;
    let prev = prev_result(conf)?;
    let registration = match conf.decide(env.get("CNI_ARGS").map(String::as_str))? {
        Decision::Skip(why) => {
            log.line(format!("not registering {netns}: {why}"));
            return Ok(prev.get().as_bytes().to_vec());
        }
        Decision::Register(registration) => registration,
    };
    let mesh = Mesh::open(&conf.pin_dir).map_err(|e| mesh_error(e, &conf.pin_dir))?;
    let ns = Netns::open(netns).map_err(|e| mesh_error(e, &conf.pin_dir))?;
    let (settings, notes) = settings_in(&registration, &ns)?;
    for note in notes {
        log.line(note);
    }
    let pod = mesh
        .register_netns(netns, &settings)
        .map_err(|e| mesh_error(e, &conf.pin_dir))?;
    let state = State {
        container_id: container_id.into(),
        ifname: ifname.into(),
        netns: netns.into(),
        netns_cookie: pod.netns_cookie,
        pin_dir: conf.pin_dir.clone(),
    };
    let path = state_path(
        &network_state_dir(&conf.state_dir, &conf.name),
        container_id,
        ifname,
    );
    if let Err(err) = state.write(&path) {
        // Without the state file DEL could not find the pod once its netns is gone.
        let _ = mesh.unregister_cookie(pod.netns_cookie);
        return Err(ErrorResult::new(
            code::IO_FAILURE,
            format!("writing {}", path.display()),
            err.to_string(),
        ));
    }
    log.line(format!(
        "registered {netns} (netns cookie {})",
        pod.netns_cookie
    ));
    Ok(prev.get().as_bytes().to_vec())
}

fn del(env: &Environment, stdin: &[u8], log: &mut Log) -> Result<(), ErrorResult> {
    let [container_id, ifname, netns] = attachment(env, false)?;
    let conf: Value = serde_json::from_slice(stdin).unwrap_or_else(|err| {
        log.line(format!(
            "conf is not JSON ({err}); using the default directories"
        ));
        Value::Null
    });
    let dir = |key: &str, default: &str| {
        PathBuf::from(conf.get(key).and_then(Value::as_str).unwrap_or(default))
    };
    let network = conf.get("name").and_then(Value::as_str).unwrap_or("");
    let network_dir = network_state_dir(&dir("state_dir", DEFAULT_STATE_DIR), network);
    let path = state_path(&network_dir, container_id, ifname);
    let (cookie, pin_dir) = match State::read(&path) {
        Some(state) => (Some(state.netns_cookie), state.pin_dir),
        // Nothing remembered (ADD skipped the pod, failed, or ran before the plugin kept
        // state): the netns itself, if it is still there, names the pod.
        None => (
            Netns::open(netns)
                .ok()
                .filter(|ns| !ns.is_host().unwrap_or(true))
                .map(|ns| ns.cookie()),
            dir("pin_dir", DEFAULT_PIN_DIR),
        ),
    };
    if let Some(cookie) = cookie {
        let shared = states(&network_dir)
            .iter()
            .any(|(other, s)| *other != path && s.netns_cookie == cookie);
        match Mesh::open(&pin_dir) {
            _ if shared => log.line(format!(
                "netns cookie {cookie} stays registered: another attachment of its netns remains"
            )),
            Ok(mesh) => {
                if mesh
                    .unregister_cookie(cookie)
                    .map_err(|e| mesh_error(e, &pin_dir))?
                {
                    log.line(format!("unregistered netns cookie {cookie}"));
                }
            }
            // Nothing attached: nothing is registered either.
            Err(Error::NotAttached { .. } | Error::BpffsNotMounted { .. }) => {}
            Err(err) => return Err(mesh_error(err, &pin_dir)),
        }
    }
    match fs::remove_file(&path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(ErrorResult::new(
            code::IO_FAILURE,
            format!("removing {}", path.display()),
            err.to_string(),
        )),
        _ => Ok(()),
    }
}

fn check(conf: &PluginConf, env: &Environment) -> Result<(), ErrorResult> {
    let [_, _, netns] = attachment(env, true)?;
    prev_result(conf)?;
    let Decision::Register(registration) = conf.decide(env.get("CNI_ARGS").map(String::as_str))?
    else {
        return Ok(());
    };
    let mesh = Mesh::open(&conf.pin_dir).map_err(|e| mesh_error(e, &conf.pin_dir))?;
    let ns = Netns::open(netns).map_err(|e| mesh_error(e, &conf.pin_dir))?;
    // The excluded interfaces' routes as they are now: a route changed since ADD shows.
    let (expected, _) = settings_in(&registration, &ns)?;
    let cookie = ns.cookie();
    let pods = mesh.pods().map_err(|e| mesh_error(e, &conf.pin_dir))?;
    match pods.into_iter().find(|p| p.netns_cookie == cookie) {
        None => Err(ErrorResult::new(
            code::NOT_REGISTERED,
            format!("{netns} is not registered (netns cookie {cookie})"),
            "the pod's traffic is not captured; delete the pod so that it is created anew",
        )),
        Some(pod) if pod.settings != expected => Err(ErrorResult::new(
            code::OTHER_SETTINGS,
            format!("{netns} is registered with other settings than its conf gives"),
            settings_diff(&pod.settings, &expected),
        )),
        Some(_) => Ok(()),
    }
}

/// The fields where `found` differs from `expected`: `registered FIELD: VALUE; conf gives
/// FIELD: VALUE` for each, lists and CIDRs as JSON shows them.
fn settings_diff(found: &PodSettings, expected: &PodSettings) -> String {
    let fields = |s: &PodSettings| match serde_json::to_value(s) {
        Ok(Value::Object(fields)) => fields,
        _ => serde_json::Map::new(),
    };
    let (found, expected) = (fields(found), fields(expected));
    found
        .iter()
        .filter(|(field, value)| expected.get(*field) != Some(*value))
        .map(|(field, value)| {
            let wanted = expected.get(field).unwrap_or(&Value::Null);
            format!("registered {field}: {value}; conf gives {field}: {wanted}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn status(conf: &PluginConf) -> Result<(), ErrorResult> {
    Mesh::open(&conf.pin_dir).map(drop).map_err(|err| {
        ErrorResult::new(
            code::NOT_AVAILABLE,
            format!("meshbpf is not attached under {}", conf.pin_dir.display()),
            format!("{err} (the node agent, `meshbpf agent`, attaches it when it starts)"),
        )
    })
}

fn gc(conf: &PluginConf, log: &mut Log) -> Result<(), ErrorResult> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        ErrorResult::config("GC without cni.dev/valid-attachments: the runtime must give it")
    })?;
    let all = states(&network_state_dir(&conf.state_dir, &conf.name));
    let is_valid = |s: &State| valid.contains(&(s.container_id.clone(), s.ifname.clone()));
    let kept: BTreeSet<u64> = all
        .iter()
        .filter(|(_, s)| is_valid(s))
        .map(|(_, s)| s.netns_cookie)
        .collect();
    let mut errors = Vec::new();
    for (path, state) in all.iter().filter(|(_, s)| !is_valid(s)) {
        if !kept.contains(&state.netns_cookie) {
            match Mesh::open(&state.pin_dir).and_then(|m| m.unregister_cookie(state.netns_cookie)) {
                Ok(true) => log.line(format!(
                    "gc: unregistered container {} ifname {} (netns cookie {})",
                    state.container_id, state.ifname, state.netns_cookie
                )),
                Ok(false) | Err(Error::NotAttached { .. } | Error::BpffsNotMounted { .. }) => {}
                Err(err) => {
                    errors.push(format!("{}: {err}", state.container_id));
                    continue;
                }
            }
        }
        if let Err(err) = fs::remove_file(path) {
            errors.push(format!("removing {}: {err}", path.display()));
        }
    }
    match errors.is_empty() {
        true => Ok(()),
        false => Err(ErrorResult::new(
            code::FAILED,
            "gc could not remove every stale attachment",
            errors.join("; "),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PluginConf, ErrorResult> {
        PluginConf::parse(text.as_bytes())
    }

    #[test]
    fn conf_keys_and_defaults() {
        let conf = parse(
            r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshbpf-cni","pin_dir":"/sys/fs/bpf/x",
               "mesh":"linkerd","exclude_outbound_ports":[3306,"5432"],"no_dns":true,
               "capabilities":{"io.kubernetes.cri.pod-annotations":true},"cni.dev/other":1}"#,
        )
        .unwrap();
        assert_eq!(conf.pin_dir, Path::new("/sys/fs/bpf/x"));
        assert_eq!(conf.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(conf.exclude_namespaces, ["kube-system"]);
        let Decision::Register(r) = conf.decide(None).unwrap() else {
            panic!("skipped")
        };
        let s = r.settings;
        assert_eq!(s.proxy_uids, [2102].into());
        assert_eq!(s.exclude_outbound_ports, [3306, 5432].into());
        assert!(!s.capture_dns);
    }

    #[test]
    fn unknown_keys_bad_values_and_versions_are_refused_by_name() {
        for (text, code, named) in [
            (r#"{"cniVersion":"1.0.0","bogus":17}"#, 2, "\"bogus\": 17"),
            (
                r#"{"cniVersion":"1.0.0","include_outbound_cidrs":"10.0.0.0/40"}"#,
                7,
                "10.0.0.0/40",
            ),
            (
                r#"{"cniVersion":"1.0.0","pin_dir":"relative"}"#,
                7,
                "pin_dir",
            ),
            (
                r#"{"cniVersion":"1.0.0","exclude_namespaces":"kube-system"}"#,
                7,
                "exclude_namespaces",
            ),
            (r#"{"cniVersion":"2.0.0"}"#, 1, "2.0.0"),
            (r#"[1,2]"#, 6, "JSON object"),
            (r#"{"cniVersion":"1.0.0","prevResult":[]}"#, 7, "prevResult"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.code, code, "{text}: {err:?}");
            assert!(err.msg.contains(named), "{text}: {err:?}");
        }
    }

    #[test]
    fn prev_result_is_kept_byte_for_byte() {
        let prev = "{ \"cniVersion\":\"1.0.0\" ,\n \"ips\": [ {\"address\":\"192.0.2.5/24\"} ],\"z\":1.50}";
        let conf = parse(&format!(r#"{{"cniVersion":"1.0.0","prevResult":{prev}}}"#)).unwrap();
        assert_eq!(prev_result(&conf).unwrap().get(), prev);
    }

    #[test]
    fn annotations_decide_injection_and_settings() {
        let with = |annotations: &str, args: Option<&str>| {
            parse(&format!(
                r#"{{"cniVersion":"1.0.0","runtimeConfig":{{"{ANNOTATIONS_CAPABILITY}":{annotations}}}}}"#
            ))
            .unwrap()
            .decide(args)
        };
        assert!(matches!(with("{}", None), Ok(Decision::Skip(_))));
        // containerd's way of saying "no annotations".
        assert!(matches!(with("null", None), Ok(Decision::Skip(_))));
        let Ok(Decision::Register(r)) = with(
            r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/foo":"1","a/b":"c"}"#,
            None,
        ) else {
            panic!("an unknown traffic annotation failed the pod")
        };
        assert_eq!(r.unknown_traffic_keys, ["traffic.sidecar.istio.io/foo"]);
        assert_eq!(r.other_keys, ["a/b"]);
        assert!(matches!(
            with(
                r#"{"sidecar.istio.io/status":"{}","sidecar.istio.io/inject":"False"}"#,
                None
            ),
            Ok(Decision::Skip(_))
        ));
        let Ok(Decision::Register(r)) = with(
            r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/excludeOutboundPorts":"3306"}"#,
            Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
        ) else {
            panic!("not registered")
        };
        let s = r.settings;
        assert_eq!(s.exclude_outbound_ports, [3306].into());
        let err = with(
            r#"{"sidecar.istio.io/status":"{}","traffic.sidecar.istio.io/includeOutboundIPRanges":"x"}"#,
            None,
        )
        .unwrap_err();
        assert!(err.msg.contains("includeOutboundIPRanges"), "{err:?}");
        assert!(matches!(
            with(
                r#"{"sidecar.istio.io/status":"{}"}"#,
                Some("K8S_POD_NAMESPACE=kube-system")
            ),
            Ok(Decision::Skip(why)) if why.contains("kube-system")
        ));
    }

    #[test]
    fn state_file_names_are_safe_and_distinct() {
        let dir = Path::new("/run/x");
        assert_eq!(
            state_path(dir, "abc.1", "eth0"),
            Path::new("/run/x/abc%2E1.eth0")
        );
        assert_ne!(
            state_path(dir, "a.b", "c"),
            state_path(dir, "a", "b.c"),
            "the separator cannot be forged"
        );
        assert_eq!(
            network_state_dir(dir, "../etc"),
            Path::new("/run/x/%2E%2E%2Fetc")
        );
    }

    #[test]
    fn a_missing_or_unknown_command_is_named_before_the_conf_is_read() {
        for command in [None, Some("FOO")] {
            let env: Environment = command
                .map(|c| ("CNI_COMMAND".to_string(), c.to_string()))
                .into_iter()
                .collect();
            let mut log = Vec::new();
            let out = run(&env, b"{not json", &mut log);
            assert!(!out.ok);
            let json: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(json["code"], code::INVALID_ENVIRONMENT, "{json}");
            assert!(
                json["msg"].as_str().unwrap().contains("CNI_COMMAND"),
                "{json}"
            );
            assert!(String::from_utf8_lossy(&log).contains("error 4"));
        }
    }

    #[test]
    fn a_route_out_of_an_interface_loses_the_longer_prefixes_routed_elsewhere() {
        let c = |t: &str| t.parse::<Cidr>().unwrap();
        let text = |v: Vec<Cidr>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        // A default route out of net1 while eth0 holds 192.0.2.0/24: everything but that.
        let rest = without(c("0.0.0.0/0"), &[c("192.0.2.0/24"), c("2001:db8::/64")]);
        assert_eq!(rest.len(), 24);
        assert!(rest
            .iter()
            .all(|r| !r.contains("192.0.2.9".parse().unwrap())));
        assert!(rest
            .iter()
            .any(|r| r.contains("192.0.3.1".parse().unwrap())));
        assert!(rest.iter().any(|r| r.contains("10.1.2.3".parse().unwrap())));
        assert_eq!(
            text(without(c("2001:db8::/32"), &[c("2001:db8::/33")])),
            ["2001:db8:8000::/33"]
        );
        // Shorter or unrelated routes elsewhere take nothing; the same prefix takes all.
        assert_eq!(
            text(without(
                c("203.0.113.0/24"),
                &[c("0.0.0.0/0"), c("198.51.100.0/24")]
            )),
            ["203.0.113.0/24"]
        );
        assert!(without(c("203.0.113.0/24"), &[c("203.0.113.0/24")]).is_empty());
    }

    #[test]
    fn settings_diff_names_the_fields() {
        let a = PodSettings::default();
        let b = PodSettings {
            outbound_port: 4140,
            ..Default::default()
        };
        let diff = settings_diff(&a, &b);
        assert!(
            diff.contains("registered outbound_port: 15001")
                && diff.contains("conf gives outbound_port: 4140"),
            "{diff}"
        );
    }
}
