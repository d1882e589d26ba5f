//! The node's CNI conf dir: meshbpf-cni's entry in the primary network configuration.
//!
//! The primary is the lexically first `.conf` or `.conflist` file, the one containerd and
//! CRI-O use. A `.conflist` gets the entry appended to its `plugins` (after the interface
//! plugin, as a chained plugin must be); a `.conf` (one plugin) is wrapped into a
//! `.conflist` of that plugin and the entry, which replaces it. Every write goes to a
//! temporary file renamed into place, so a runtime never reads half a file.
//!
//! The primary CNI plugin rewrites its file whenever it likes, and Linux has no rename
//! that replaces a file only if it is still the one read. So a file is replaced by
//! exchanging (`renameat2(RENAME_EXCHANGE)`) the edited copy with it, which hands back what
//! was there at that instant: when that is not the version the edit was based on (another
//! inode, or the same one written in place), the primary wrote meanwhile, and the edit is
//! made again on that newer version and exchanged again. The primary's newest write is thus
//! never undone; at worst, for the moment between two exchanges, the file holds the older
//! version with the entry. A filesystem without the exchange (`EINVAL`) gets a check of the
//! file's identity and content right before a plain rename.
//!
//! A network configuration that is a symbolic link (an administrator's, to a file kept
//! elsewhere) is edited where it leads, as the runtime reads it, and the link stays. The
//! agent also watches the directory it leads to.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{renameat2, RenameFlags};

use serde_json::{json, Value};

use meshbpf::{Error, Result};
use meshbpf_cni::PLUGIN_TYPE;

use crate::agent::context::Context;

/// The key under which a `.conflist` that [`insert`] made of a `.conf` keeps that `.conf`.
const WRAPPED_KEY: &str = "meshbpfWrappedConf";
/// The key under which such a `.conflist` keeps where the `.conf` linked to, when it was a
/// symbolic link: [`remove`] puts the link back.
const WRAPPED_LINK_KEY: &str = "meshbpfWrappedLink";
/// How many newer versions of one file the primary may write while meshbpf edits it before
/// meshbpf leaves the file (with the primary's newest version) to the next round.
const MAX_REBASES: usize = 32;

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
        // A link that leads nowhere is listed too (the runtime fails on it as well): its
        // problem is named, not skipped.
        .filter(|p| {
            matches!(extension(p), "conf" | "conflist")
                && fs::symlink_metadata(p).is_ok_and(|m| m.is_file() || m.is_symlink())
        })
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

/// A file's content as read, and which file (inode) that was.
#[derive(Clone, Debug)]
struct Version {
    /// Device and inode.
    id: (u64, u64),
    /// Permission bits.
    mode: u32,
    text: Vec<u8>,
}

impl Version {
    /// Reads `path` through one descriptor: the content and the inode it came from agree.
    fn read(path: &Path) -> std::io::Result<Version> {
        let mut file = fs::File::open(path)?;
        let md = file.metadata()?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        Ok(Version {
            id: (md.dev(), md.ino()),
            mode: md.mode() & 0o7777,
            text,
        })
    }

    /// The same file with the same content: nobody wrote it in between.
    fn same(&self, other: &Version) -> bool {
        self.id == other.id && self.text == other.text
    }
}

/// The file that the network configuration `path` stands for: `path` itself, or the
/// regular file its symbolic link leads to (wherever that is: the administrator chose it,
/// and the runtime reads it there).
fn target_of(path: &Path) -> Result<PathBuf> {
    let md = fs::symlink_metadata(path).context(|| format!("reading {}", path.display()))?;
    if !md.file_type().is_symlink() {
        return Ok(path.into());
    }
    let link = |reason: String| Error::CniConfigLink {
        path: path.into(),
        target: fs::read_link(path).unwrap_or_default(),
        reason,
    };
    let target =
        fs::canonicalize(path).map_err(|err| link(format!("cannot be resolved ({err})")))?;
    match fs::metadata(&target) {
        Ok(md) if md.is_file() => Ok(target),
        Ok(_) => Err(link("is not a regular file".into())),
        Err(err) => Err(link(format!("cannot be read ({err})"))),
    }
}

/// The directories outside `dir` that the symbolic links among its network configurations
/// lead into: a primary CNI that rewrites its file there is watched there.
pub fn linked_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = network_files(dir)
        .unwrap_or_default()
        .iter()
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()))
        .filter_map(|p| Some(target_of(p).ok()?.parent()?.to_path_buf()))
        .filter(|d| fs::canonicalize(dir).ok().as_ref() != Some(d))
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

fn parse_json(path: &Path, text: &[u8]) -> Result<Value> {
    let value: Value = serde_json::from_slice(text).map_err(|err| Error::CniConfig {
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
/// already is not written. A version the primary writes meanwhile is never undone (see the
/// module docs).
pub fn insert(dir: &Path, entry: &Value) -> Result<Insertion> {
    let Some(path) = primary(dir)? else {
        return Ok(Insertion::NoPrimary);
    };
    let target = target_of(&path)?;
    let read = Version::read(&target).context(|| format!("reading {}", target.display()))?;
    if extension(&path) == "conflist" {
        let edit = |text: &[u8]| with_entry(&target, text, entry);
        return Ok(match replace(&target, read, edit)? {
            true => Insertion::Written(path),
            false => Insertion::Unchanged(path),
        });
    }
    // A .conf: wrapped into a .conflist of the same name, and taken away in one step (a
    // rename); what was taken is checked: a newer .conf than the one wrapped (the primary
    // wrote again) is wrapped in its turn.
    let to = path.with_extension("conflist");
    let taken = tmp_path(&path, "taken");
    let mut link = fs::read_link(&path).ok();
    let mut wrapped = read;
    for _ in 0..MAX_REBASES {
        let list = wrap(&path, &wrapped.text, entry, link.as_deref())?;
        write_atomically(&to, &list, wrapped.mode)?;
        match fs::rename(&path, &taken) {
            // Gone already (another agent's round took it): the wrap is in place.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Insertion::Wrapped { from: path, to })
            }
            other => other.context(|| format!("moving {} aside", path.display()))?,
        }
        let now = Version::read(&taken);
        match now {
            Ok(now) if !now.same(&wrapped) => {
                if let Err(err) = parse_json(&path, &now.text) {
                    // Not one to wrap: it goes back as the primary wrote it (unless an even
                    // newer one is there already), and the error says why.
                    let back = renameat2(None, &taken, None, &path, RenameFlags::RENAME_NOREPLACE);
                    if back.is_err() {
                        let _ = fs::remove_file(&taken);
                    }
                    return Err(err);
                }
                link = fs::read_link(&taken).ok();
                wrapped = now;
                let _ = fs::remove_file(&taken);
            }
            _ => {
                let _ = fs::remove_file(&taken);
                return Ok(Insertion::Wrapped { from: path, to });
            }
        }
    }
    // Still the newest .conf seen, wrapped.
    let list = wrap(&path, &wrapped.text, entry, link.as_deref())?;
    write_atomically(&to, &list, wrapped.mode)?;
    Ok(Insertion::Wrapped { from: path, to })
}

/// `text` (a `.conflist`) with `entry` last among its plugins and no other meshbpf-cni
/// entry; none when it is that already.
fn with_entry(path: &Path, text: &[u8], entry: &Value) -> Result<Option<Value>> {
    let mut conf = parse_json(path, text)?;
    let plugins = conf
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| Error::CniConfig {
            path: path.into(),
            reason: "a .conflist without a plugins list".into(),
        })?;
    let before = plugins.clone();
    plugins.retain(|p| !is_ours(p));
    plugins.push(entry.clone());
    Ok((*plugins != before).then_some(conf))
}

/// The `.conflist` of the `.conf` `text` and `entry`, keeping the `.conf` (and where it
/// linked to, if it was a link) for [`remove`] to put back.
fn wrap(path: &Path, text: &[u8], entry: &Value, link: Option<&Path>) -> Result<Value> {
    let conf = parse_json(path, text)?;
    let mut plugin = conf.as_object().cloned().unwrap_or_default();
    let version = plugin
        .remove("cniVersion")
        .unwrap_or_else(|| json!("0.3.1"));
    let name = plugin.remove("name").unwrap_or(Value::Null);
    let mut list = json!({"cniVersion": version, "name": name, "plugins": [plugin, entry]});
    // The .conf as it was, for `remove` to put back (runtimes ignore keys they do not know).
    list[WRAPPED_KEY] = conf;
    if let Some(link) = link {
        list[WRAPPED_LINK_KEY] = link.to_string_lossy().into();
    }
    Ok(list)
}

/// Replaces `path` (a regular file, see [`target_of`]), which was `read`, with `edit` of
/// its content, unless `edit` has nothing to change. When the primary wrote a newer
/// version meanwhile, `edit` is made on that one instead, and so on. Returns whether
/// anything was written.
fn replace(
    path: &Path,
    read: Version,
    edit: impl Fn(&[u8]) -> Result<Option<Value>>,
) -> Result<bool> {
    let mut base = read;
    // What this call put in place last: an edit of a version the primary has superseded.
    let mut stale: Option<Version> = None;
    for _ in 0..MAX_REBASES {
        let text = match edit(&base.text) {
            Ok(Some(value)) => pretty(&value),
            Ok(None) if stale.is_none() => return Ok(false),
            Err(err) if stale.is_none() => return Err(err),
            // A stale edit is in the place of a newer version that needs no edit (or cannot
            // have one: the next round says why): put that version back as it is.
            _ => base.text.clone(),
        };
        let expected = stale.as_ref().unwrap_or(&base);
        let tmp = tmp_path(path, "tmp");
        let written = write_new(&tmp, &text, base.mode)?;
        // The last look before the exchange: a newer version seen now costs no exchange.
        match Version::read(path) {
            Ok(now) if !now.same(expected) && stale.is_none() => {
                let _ = fs::remove_file(&tmp);
                base = now;
                continue;
            }
            _ => {}
        }
        match renameat2(None, &tmp, None, path, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => {}
            // The primary removed its file: nothing to edit any more.
            Err(Errno::ENOENT) => {
                let _ = fs::remove_file(&tmp);
                return Ok(stale.is_some());
            }
            // No exchange on this filesystem: the check above, then a plain rename.
            Err(Errno::EINVAL) => {
                return fs::rename(&tmp, path).map(|()| true).map_err(|cause| {
                    let _ = fs::remove_file(&tmp);
                    Error::Io {
                        context: format!("writing {}", path.display()),
                        cause,
                    }
                });
            }
            Err(errno) => {
                let _ = fs::remove_file(&tmp);
                return Err(Error::Io {
                    context: format!("writing {}", path.display()),
                    cause: errno.into(),
                });
            }
        }
        // `tmp` now holds what `path` held at the exchange.
        let displaced = Version::read(&tmp);
        let _ = fs::remove_file(&tmp);
        match displaced {
            Ok(displaced) if !displaced.same(expected) => {
                // The primary wrote `displaced` after `base` was read: edit that one.
                base = displaced;
                stale = Some(written);
            }
            _ => return Ok(true),
        }
    }
    // Given up: the primary's last version seen goes back in the place of the stale edit,
    // as the primary wrote it (unless it wrote again meanwhile: that one stays).
    if let Some(stale) = stale {
        let tmp = tmp_path(path, "tmp");
        write_new(&tmp, &base.text, base.mode)?;
        if renameat2(None, &tmp, None, path, RenameFlags::RENAME_EXCHANGE).is_ok()
            && Version::read(&tmp).is_ok_and(|displaced| !displaced.same(&stale))
        {
            let _ = renameat2(None, &tmp, None, path, RenameFlags::RENAME_EXCHANGE);
        }
        let _ = fs::remove_file(&tmp);
    }
    Err(Error::CniConfigBusy {
        path: path.into(),
        rounds: MAX_REBASES,
    })
}

/// The name of a temporary file beside `path` that no runtime loads.
fn tmp_path(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".meshbpf-{name}.{what}"))
}

fn pretty(value: &Value) -> Vec<u8> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text.into_bytes()
}

/// Creates `path` anew (an entry of that name goes first; a symbolic link there is not
/// followed), with `text` and `mode`, on disk; returns it as written.
fn write_new(path: &Path, text: &[u8], mode: u32) -> Result<Version> {
    use std::os::unix::fs::PermissionsExt;
    let write = || -> std::io::Result<Version> {
        match fs::remove_file(path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(text)?;
        file.sync_all()?;
        let md = file.metadata()?;
        Ok(Version {
            id: (md.dev(), md.ino()),
            mode,
            text: text.to_vec(),
        })
    };
    write().map_err(|cause| {
        let _ = fs::remove_file(path);
        Error::Io {
            context: format!("writing {}", path.display()),
            cause,
        }
    })
}

/// Takes every meshbpf-cni entry out of every network configuration of `dir`; returns the
/// files it wrote. A `.conflist` that [`insert`] made of a `.conf` becomes that `.conf`
/// again, as it was, unless the primary has written a new `.conf` since (which then stays,
/// and the wrap goes). Files that are not JSON are left alone (they are not meshbpf's).
pub fn remove(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for path in network_files(dir)? {
        let Ok(target) = target_of(&path) else {
            continue;
        };
        let Ok(read) = Version::read(&target) else {
            continue;
        };
        let Ok(mut conf) = parse_json(&target, &read.text) else {
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
                if fs::symlink_metadata(&restored).is_err() {
                    match conf.get(WRAPPED_LINK_KEY).and_then(Value::as_str) {
                        Some(link) => std::os::unix::fs::symlink(link, &restored)
                            .context(|| format!("linking {} to {link}", restored.display()))?,
                        None => write_atomically(&restored, &original, read.mode)?,
                    }
                    written.push(restored);
                }
                fs::remove_file(&path).context(|| format!("removing {}", path.display()))?;
            }
            // (A wrap that other plugins joined since stays a .conflist, no longer a wrap.)
            _ if ours => {
                let edit = |text: &[u8]| without_entry(&target, text);
                if replace(&target, read, edit)? {
                    written.push(path);
                }
            }
            _ => {}
        }
    }
    Ok(written)
}

/// `text` (a `.conflist`) without meshbpf-cni's entries; none when it has none.
fn without_entry(path: &Path, text: &[u8]) -> Result<Option<Value>> {
    let mut conf = parse_json(path, text)?;
    let Some(plugins) = conf.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(None);
    }
    if let Some(c) = conf.as_object_mut() {
        c.remove(WRAPPED_KEY);
        c.remove(WRAPPED_LINK_KEY);
    }
    Ok(Some(conf))
}

/// Writes `value` (pretty JSON) to `path` with `mode` through a temporary file in the same
/// directory, whose name no runtime loads, renamed into place.
fn write_atomically(path: &Path, value: &Value, mode: u32) -> Result<()> {
    let tmp = tmp_path(path, "tmp");
    write_new(&tmp, &pretty(value), mode)?;
    fs::rename(&tmp, path).map_err(|cause| {
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

    /// The primary CNI's revision `n` of its conflist, without meshbpf's entry.
    fn revision(n: u64) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","revision":{n},"plugins":[{{"type":"ptp","mtu":{n}}}]}}"#
        )
    }

    /// The primary CNI's revision `n` of a `.conf`.
    fn conf_revision(n: u64) -> String {
        format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ptp","revision":{n}}}"#)
    }

    /// A primary CNI that writes `count` new revisions (`text`) of `path`, each through a
    /// temporary file renamed into place (as Calico, Cilium and kindnet do), 10-50 ms
    /// apart; returns the last revision written.
    fn primary_writer(path: PathBuf, text: fn(u64) -> String, first: u64, count: u64) -> u64 {
        let tmp = path.with_file_name(".primary.tmp");
        let mut state = first | 1;
        for n in first..first + count {
            // xorshift: a spread of intervals without a dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            std::thread::sleep(std::time::Duration::from_millis(10 + state % 41));
            fs::write(&tmp, text(n)).unwrap();
            fs::rename(&tmp, &path).unwrap();
        }
        first + count - 1
    }

    /// Rounds of the primary writing `name` (revisions `text`) while the agent inserts as
    /// fast as it can, with an entry that changes every time (as when its ConfigMap
    /// changes), so that every insert writes: one is under way whenever the primary
    /// writes. After each round, a last insert (the watch's last look); then `conflist`
    /// must hold the newest revision (wrapped, for a `.conf`) and the last entry. Returns
    /// the rounds that did not end so.
    fn race(
        dir: &Dir,
        name: &str,
        text: fn(u64) -> String,
        conflist: &str,
        (rounds, per_round): (u64, u64),
    ) -> Vec<String> {
        let path = dir.write(name, &text(0));
        let conflist = dir.0.join(conflist);
        let mut generation = 0;
        let mut entry_of = || {
            generation += 1;
            let mut e = entry();
            e["generation"] = json!(generation);
            e
        };
        let mut lost = Vec::new();
        for round in 0..rounds {
            let first = 1 + round * per_round;
            let writer = {
                let path = path.clone();
                std::thread::spawn(move || primary_writer(path, text, first, per_round))
            };
            while !writer.is_finished() {
                insert(&dir.0, &entry_of()).unwrap();
            }
            let newest = writer.join().unwrap();
            let last = entry_of();
            insert(&dir.0, &last).unwrap();
            let conf: Value =
                serde_json::from_str(&fs::read_to_string(&conflist).unwrap()).unwrap();
            let revision = conf
                .get(WRAPPED_KEY)
                .unwrap_or(&conf)
                .get("revision")
                .cloned();
            let entry_last = conf["plugins"].as_array().unwrap().last() == Some(&last);
            if revision != Some(json!(newest)) || !entry_last {
                lost.push(format!("round {round}: revision {revision:?} of {newest}"));
            }
        }
        let names: Vec<String> = fs::read_dir(&dir.0)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [conflist.file_name().unwrap().to_str().unwrap()],
            "left"
        );
        lost
    }

    #[test]
    fn the_primary_s_newest_revision_survives_inserts_racing_its_rewrites() {
        let dir = Dir::new("race");
        let lost = race(
            &dir,
            "10-k8s.conflist",
            revision,
            "10-k8s.conflist",
            (24, 6),
        );
        assert!(lost.is_empty(), "the newest write was undone: {lost:?}");
    }

    #[test]
    fn the_primary_s_newest_conf_is_the_one_wrapped_when_wraps_race_its_rewrites() {
        let dir = Dir::new("race-conf");
        // Short rounds, many: a .conf is lost only in the moment between its wrap and its
        // removal.
        let lost = race(
            &dir,
            "10-k8s.conf",
            conf_revision,
            "10-k8s.conflist",
            (80, 2),
        );
        assert!(lost.is_empty(), "the newest .conf was lost: {lost:?}");
    }

    #[test]
    fn a_primary_rewriting_faster_than_any_edit_keeps_its_newest_version() {
        let dir = Dir::new("busy");
        let path = dir.write("10-k8s.conflist", &revision(0));
        let mut busy = 0;
        for round in 0..4u64 {
            let first = 1 + round * 2000;
            // No pause between two writes: every edit finds a newer version.
            let writer = {
                let (path, tmp) = (path.clone(), dir.0.join(".primary.tmp"));
                std::thread::spawn(move || {
                    for n in first..first + 2000 {
                        fs::write(&tmp, revision(n)).unwrap();
                        fs::rename(&tmp, &path).unwrap();
                    }
                    first + 1999
                })
            };
            while !writer.is_finished() {
                match insert(&dir.0, &entry()) {
                    Err(Error::CniConfigBusy { .. }) => busy += 1,
                    other => {
                        other.unwrap();
                    }
                }
            }
            let newest = writer.join().unwrap();
            // The primary's newest version is in place, with or without the entry, never
            // an older one; the next insert completes it.
            let conf: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(conf["revision"], newest, "round {round}, {busy} given up");
            insert(&dir.0, &entry()).unwrap();
            let conf: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(conf["revision"], newest);
            assert_eq!(conf["plugins"].as_array().unwrap().last(), Some(&entry()));
        }
        eprintln!("{busy} inserts gave up");
    }

    #[test]
    fn a_symlinked_primary_is_edited_where_it_leads_and_the_link_stays() {
        let dir = Dir::new("link");
        let kept = Dir::new("link-target");
        let target = kept.write(
            "k8s.conflist",
            r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp"}]}"#,
        );
        let link = dir.0.join("10-k8s.conflist");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(linked_dirs(&dir.0), [fs::canonicalize(&kept.0).unwrap()]);

        assert_eq!(
            insert(&dir.0, &entry()).unwrap(),
            Insertion::Written(link.clone())
        );
        assert_eq!(fs::read_link(&link).unwrap(), target, "the link stays");
        let conf: Value = serde_json::from_str(&fs::read_to_string(&target).unwrap()).unwrap();
        assert_eq!(conf["plugins"], json!([{"type": "ptp"}, entry()]));
        assert_eq!(
            insert(&dir.0, &entry()).unwrap(),
            Insertion::Unchanged(link.clone())
        );
        assert_eq!(remove(&dir.0).unwrap(), vec![link.clone()]);
        assert_eq!(fs::read_link(&link).unwrap(), target);
        let conf: Value = serde_json::from_str(&fs::read_to_string(&target).unwrap()).unwrap();
        assert_eq!(conf["plugins"], json!([{"type": "ptp"}]));
        for d in [&dir.0, &kept.0] {
            assert_eq!(
                fs::read_dir(d).unwrap().count(),
                1,
                "no temporary file left"
            );
        }

        // A link to what the agent cannot see (its directory not mounted into the agent).
        fs::remove_file(&target).unwrap();
        let err = insert(&dir.0, &entry()).unwrap_err().to_string();
        assert!(
            err.contains("10-k8s.conflist is a symbolic link to") && err.contains("mount the"),
            "{err}"
        );
    }

    #[test]
    fn a_symlinked_conf_is_wrapped_and_its_link_put_back_at_remove() {
        let dir = Dir::new("conflink");
        let flannel = r#"{"cniVersion":"0.4.0","name":"cbr0","type":"flannel"}"#;
        let target = dir.write("flannel.json", flannel);
        let conf = dir.0.join("10-flannel.conf");
        std::os::unix::fs::symlink("flannel.json", &conf).unwrap();
        let to = dir.0.join("10-flannel.conflist");
        assert_eq!(
            insert(&dir.0, &entry()).unwrap(),
            Insertion::Wrapped {
                from: conf.clone(),
                to: to.clone()
            }
        );
        assert!(fs::symlink_metadata(&conf).is_err());
        assert_eq!(fs::read_to_string(&target).unwrap(), flannel, "untouched");
        assert_eq!(remove(&dir.0).unwrap(), vec![conf.clone()]);
        assert_eq!(fs::read_link(&conf).unwrap(), Path::new("flannel.json"));
        assert!(!to.exists());
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
