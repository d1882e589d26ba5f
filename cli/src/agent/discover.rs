//! Pods that existed before the plugin was installed, found without a Kubernetes API: a
//! network namespace where a socket of the proxy's uid listens on the outbound port is a pod
//! with a sidecar. `/proc/PID/net/tcp{,6}` lists the sockets of PID's network namespace, so
//! one process per namespace is read.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

/// A network namespace where a sidecar listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sidecar {
    /// A process in the namespace.
    pub pid: u32,
    /// The namespace's nsfs inode.
    pub netns_inode: u64,
}

impl Sidecar {
    /// The namespace's path through that process.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }
}

/// Every network namespace where a TCP socket (IPv4 or IPv6) owned by one of `uids` listens
/// on `port`. The caller must still refuse the host's own namespace.
pub fn find_sidecars(uids: &BTreeSet<u32>, port: u16) -> Vec<Sidecar> {
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(netns_inode) = fs::read_link(entry.path().join("ns/net"))
            .ok()
            .and_then(|l| netns_inode(&l.to_string_lossy()))
        else {
            continue;
        };
        if !seen.insert(netns_inode) {
            continue;
        }
        let listens = ["tcp", "tcp6"].iter().any(|table| {
            fs::read_to_string(entry.path().join("net").join(table))
                .is_ok_and(|text| listening(&text, port, uids))
        });
        if listens {
            found.push(Sidecar { pid, netns_inode });
        }
    }
    found
}

fn netns_inode(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Whether a `/proc/net/tcp` or `tcp6` table has a socket owned by one of `uids` listening
/// on `port`. Columns: `sl local_address rem_address st ... uid ...`, addresses `HEX:PORT`,
/// state `0A` = LISTEN.
fn listening(table: &str, port: u16, uids: &BTreeSet<u32>) -> bool {
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(state), Some(uid)) = (fields.get(1), fields.get(3), fields.get(7))
        else {
            return false;
        };
        let local_port = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        *state == "0A"
            && local_port == Some(port)
            && uid.parse::<u32>().is_ok_and(|u| uids.contains(&u))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 41242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41243 1 0000000000000000 100 0 0 10 0
   2: 0100007F:9C40 0100007F:3A99 01 00000000:00000000 00:00000000 00000000  1000        0 41244 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn a_listener_of_the_proxy_uid_on_the_port_is_a_sidecar() {
        let proxy = BTreeSet::from([1337]);
        assert!(listening(TABLE, 15001, &proxy));
        // Another uid's listener, a connection to the port, another port: not a sidecar.
        assert!(!listening(TABLE, 8080, &proxy));
        assert!(!listening(TABLE, 15001, &BTreeSet::from([1000])));
        assert!(!listening(TABLE, 40000, &BTreeSet::from([1000])));
    }
}
