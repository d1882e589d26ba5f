//! The node's CNI conf dir: meshbpf-cni's entry in the primary network configuration.
//!
//! The primary is the lexically first `.conf` or `.conflist` file, the one containerd and
//! CRI-O use. A `.conflist` gets the entry appended to its `plugins` (after the interface
//! plugin, as a chained plugin must be); a `.conf` (one plugin) is wrapped into a
//! `.conflist` of that plugin and the entry, which replaces it. Every write goes to a
//! temporary file renamed into place, so a runtime never reads half a file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::cni::PLUGIN_TYPE;
use crate::error::{Context, Error, Result};

/// The key under which a `.conflist` that [`insert`] made of a `.conf` keeps that `.conf`.
const WRAPPED_KEY: &str = "meshbpfWrappedConf";

/// What [`insert`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Insertion {
    /// No `.conf` or `.conflist` yet: the primary CNI has not written its configuration.
    NoPrimary,
    /// The primary conflist holds the entry already, exactly as given.
    Unchanged(PathBuf),
    /// The entry was added to the primary conflist, or replaced there.
    Written(PathBuf),
    /// A `.conf` primary was wrapped into a `.conflist` that holds the entry.
    Wrapped {
        /// The `.conf`, now removed.
        from: PathBuf,
        /// The `.conflist` written in its place.
        to: PathBuf,
    },
}

/// The primary network configuration of `dir`: its lexically first `.conf` or `.conflist`.
pub fn primary(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(network_files(dir)?.into_iter().next())
}

/// Every `.conf` and `.conflist` file of `dir`, sorted by name.
fn network_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.context(|| format!("reading {}", dir.display()))?,
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| matches!(extension(p), "conf" | "conflist") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read(path).context(|| format!("reading {}", path.display()))?;
    let value: Value = serde_json::from_slice(&text).map_err(|err| Error::CniConfig {
        path: path.into(),
        reason: format!("not JSON ({err})"),
    })?;
    if !value.is_object() {
        return Err(Error::CniConfig {
            path: path.into(),
            reason: "not a JSON object".into(),
        });
    }
    Ok(value)
}

/// Puts `entry` (meshbpf-cni's plugin conf) last in the primary network configuration of
/// `dir`, replacing any meshbpf-cni entry there. Idempotent: a primary that holds it
/// already is not written.
pub fn insert(dir: &Path, entry: &Value) -> Result<Insertion> {
    let Some(path) = primary(dir)? else {
        return Ok(Insertion::NoPrimary);
    };
    let mut conf = read_json(&path)?;
    if extension(&path) == "conflist" {
        let plugins = conf
            .get_mut("plugins")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| Error::CniConfig {
                path: path.clone(),
                reason: "a .conflist without a plugins list".into(),
            })?;
        let before = plugins.clone();
        plugins.retain(|p| !is_ours(p));
        plugins.push(entry.clone());
        if *plugins == before {
            return Ok(Insertion::Unchanged(path));
        }
        write_atomically(&path, &conf, &path)?;
        return Ok(Insertion::Written(path));
    }
    // A .conf: one plugin, with the network's name and version beside its own keys.
    let mut plugin = conf.as_object().cloned().unwrap_or_default();
    let version = plugin
        .remove("cniVersion")
        .unwrap_or_else(|| json!("0.3.1"));
    let name = plugin.remove("name").unwrap_or(Value::Null);
    let mut list = json!({"cniVersion": version, "name": name, "plugins": [plugin, entry]});
    // The .conf as it was, for `remove` to put back (runtimes ignore keys they do not know).
    list[WRAPPED_KEY] = conf;
    let to = path.with_extension("conflist");
    write_atomically(&to, &list, &path)?;
    fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
    Ok(Insertion::Wrapped { from: path, to })
}

/// Takes every meshbpf-cni entry out of every network configuration of `dir`; returns the
/// files it wrote. A `.conflist` that [`insert`] made of a `.conf` becomes that `.conf`
/// again, as it was, unless the primary has written a new `.conf` since (which then stays,
/// and the wrap goes). Files that are not JSON are left alone (they are not meshbpf's).
pub fn remove(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for path in network_files(dir)? {
        let Ok(mut conf) = read_json(&path) else {
            continue;
        };
        let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        let (ours, alone) = (plugins.len() != before, plugins.len() == 1);
        let wrapped = conf.as_object_mut().and_then(|c| c.remove(WRAPPED_KEY));
        match wrapped {
            Some(original) if ours && alone && extension(&path) == "conflist" => {
                let restored = path.with_extension("conf");
                if !restored.exists() {
                    write_atomically(&restored, &original, &path)?;
                    written.push(restored);
                }
                fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
            }
            // (A wrap that other plugins joined since stays a .conflist, no longer a wrap.)
            _ if ours => {
                write_atomically(&path, &conf, &path)?;
                written.push(path);
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Writes `value` (pretty JSON) to `path` through a temporary file in the same directory,
/// whose name no runtime loads, renamed into place; the file keeps the mode of `like`.
fn write_atomically(path: &Path, value: &Value, like: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".meshbpf-{name}.tmp"));
    let mode = fs::metadata(like).map_or(0o644, |m| m.permissions().mode() & 0o7777);
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
        text.push('\n');
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|cause| {
        let _ = fs::remove_file(&tmp);
        Error::Io {
            context: format!("writing {}", path.display()),
            cause,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let path = std::env::temp_dir()
                .join(format!("meshbpf-conflist-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            Dir(path)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entry() -> Value {
        json!({"type": PLUGIN_TYPE, "capabilities": {"io.kubernetes.cri.pod-annotations": true}})
    }

    #[test]
    fn the_lexically_first_conf_or_conflist_is_the_primary() {
        let dir = Dir::new("primary");
        assert_eq!(primary(&dir.0).unwrap(), None);
        dir.write("99-other.conflist", "{}");
        dir.write("05-notes.txt", "{}");
        dir.write("10-net.conf", "{}");
        assert_eq!(primary(&dir.0).unwrap(), Some(dir.0.join("10-net.conf")));
    }

    #[test]
    fn a_conflist_gets_the_entry_last_once_and_keeps_its_key_order() {
        let dir = Dir::new("conflist");
        let path = dir.write(
            "10-net.conflist",
            r#"{"name":"k8s","cniVersion":"1.0.0","plugins":[{"type":"ptp","zeta":1,"alpha":2},{"type":"meshbpf-cni","old":true},{"type":"portmap"}]}"#,
        );
        assert_eq!(
            insert(&dir.0, &entry()).unwrap(),
            Insertion::Written(path.clone())
        );
        let text = fs::read_to_string(&path).unwrap();
        let conf: Value = serde_json::from_str(&text).unwrap();
        let types: Vec<&str> = conf["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["ptp", "portmap", "meshbpf-cni"]);
        assert_eq!(conf["plugins"][2], entry());
        assert!(
            text.find("\"name\"") < text.find("\"cniVersion\""),
            "{text}"
        );
        assert!(text.find("zeta") < text.find("alpha"), "{text}");
        assert_eq!(
            insert(&dir.0, &entry()).unwrap(),
            Insertion::Unchanged(path.clone())
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), text);

        assert_eq!(remove(&dir.0).unwrap(), std::slice::from_ref(&path));
        let conf: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(conf["plugins"].as_array().unwrap().len(), 2);
        assert!(remove(&dir.0).unwrap().is_empty());
    }

    #[test]
    fn a_conf_is_wrapped_into_a_conflist() {
        let dir = Dir::new("conf");
        let flannel = r#"{"cniVersion":"0.4.0","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}"#;
        let conf = dir.write("10-flannel.conf", flannel);
        let to = dir.0.join("10-flannel.conflist");
        assert_eq!(
            insert(&dir.0, &entry()).unwrap(),
            Insertion::Wrapped {
                from: conf.clone(),
                to: to.clone()
            }
        );
        assert!(!conf.exists());
        let list: Value = serde_json::from_str(&fs::read_to_string(&to).unwrap()).unwrap();
        let original: Value = serde_json::from_str(flannel).unwrap();
        assert_eq!(
            list,
            json!({"cniVersion":"0.4.0","name":"cbr0","plugins":[
                {"type":"flannel","delegate":{"isDefaultGateway":true}}, entry()],
                "meshbpfWrappedConf": original})
        );
        assert_eq!(
            insert(&dir.0, &entry()).unwrap(),
            Insertion::Unchanged(to.clone())
        );
        // Removing the entry puts the .conf back as it was, and the wrap goes.
        assert_eq!(remove(&dir.0).unwrap(), vec![conf.clone()]);
        assert!(!to.exists());
        let back: Value = serde_json::from_str(&fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(back, original);
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&original).unwrap(),
            "key order kept"
        );
    }

    #[test]
    fn a_wrap_is_not_put_back_over_a_new_conf_nor_when_plugins_were_added() {
        let dir = Dir::new("rewrap");
        let old = r#"{"cniVersion":"0.4.0","name":"cbr0","type":"flannel"}"#;
        let conf = dir.write("10-flannel.conf", old);
        insert(&dir.0, &entry()).unwrap();
        // The primary writes a new .conf meanwhile: it stays, the stale wrap goes.
        let new = r#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","mtu":1400}"#;
        dir.write("10-flannel.conf", new);
        assert!(remove(&dir.0).unwrap().is_empty());
        assert_eq!(fs::read_to_string(&conf).unwrap(), new);
        assert!(!dir.0.join("10-flannel.conflist").exists());

        // Another tool chained its plugin into the wrap: a .conflist it stays.
        let dir = Dir::new("added");
        dir.write("10-flannel.conf", old);
        insert(&dir.0, &entry()).unwrap();
        let list_path = dir.0.join("10-flannel.conflist");
        let mut list: Value =
            serde_json::from_str(&fs::read_to_string(&list_path).unwrap()).unwrap();
        list["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "portmap"}));
        fs::write(&list_path, list.to_string()).unwrap();
        assert_eq!(remove(&dir.0).unwrap(), vec![list_path.clone()]);
        let left: Value = serde_json::from_str(&fs::read_to_string(&list_path).unwrap()).unwrap();
        assert_eq!(
            left,
            json!({"cniVersion":"0.4.0","name":"cbr0","plugins":[{"type":"flannel"},{"type":"portmap"}]})
        );
        assert!(!dir.0.join("10-flannel.conf").exists());
    }

    #[test]
    fn a_primary_that_is_not_json_is_named() {
        let dir = Dir::new("broken");
        dir.write("10-net.conflist", "{\"plugins\": [");
        let err = insert(&dir.0, &entry()).unwrap_err().to_string();
        assert!(
            err.contains("10-net.conflist") && err.contains("not JSON"),
            "{err}"
        );
    }
}
