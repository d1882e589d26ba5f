//! The CNI commands: ADD, DEL, CHECK, STATUS, GC.

use std::collections::BTreeSet;
use std::fs::{self};
use std::path::{Path, PathBuf};

use serde_json::value::RawValue;
use serde_json::Value;

use meshbpf::Error;
use meshbpf::Netns;
use meshbpf::PodSettings;
use meshbpf::{Mesh, DEFAULT_PIN_DIR};

use super::*;

/// The attachment named by `CNI_CONTAINERID` and `CNI_IFNAME` (and `CNI_NETNS`, when
/// `netns` is required); the error names every variable missing.
pub(super) fn attachment(env: &Environment, netns: bool) -> Result<[&str; 3], ErrorResult> {
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
pub(super) fn mesh_error(err: Error, pin_dir: &Path) -> ErrorResult {
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

pub(super) fn prev_result(conf: &PluginConf) -> Result<&RawValue, ErrorResult> {
    conf.prev_result.as_deref().ok_or_else(|| {
        ErrorResult::config(
            "no prevResult: meshbpf-cni is a chained plugin; list it after the interface \
             plugin (bridge, calico, cilium, ...) in the conflist's plugins",
        )
    })
}

pub(super) fn add(
    conf: &PluginConf,
    env: &Environment,
    log: &mut Log,
) -> Result<Vec<u8>, ErrorResult> {
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

pub(super) fn del(env: &Environment, stdin: &[u8], log: &mut Log) -> Result<(), ErrorResult> {
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

pub(super) fn check(conf: &PluginConf, env: &Environment) -> Result<(), ErrorResult> {
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
pub(super) fn settings_diff(found: &PodSettings, expected: &PodSettings) -> String {
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

pub(super) fn status(conf: &PluginConf) -> Result<(), ErrorResult> {
    Mesh::open(&conf.pin_dir).map(drop).map_err(|err| {
        ErrorResult::new(
            code::NOT_AVAILABLE,
            format!("meshbpf is not attached under {}", conf.pin_dir.display()),
            format!("{err} (the node agent, `meshbpf agent`, attaches it when it starts)"),
        )
    })
}

pub(super) fn gc(conf: &PluginConf, log: &mut Log) -> Result<(), ErrorResult> {
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
