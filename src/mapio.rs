//! Reading whole maps in few system calls: `BPF_MAP_LOOKUP_BATCH` where the map type has
//! it, key by key where not (LPM tries), with every error reported rather than ending the
//! walk early.

use std::os::fd::AsRawFd;

use libbpf_rs::{libbpf_sys, MapCore, MapFlags, MapType};

use crate::error::{Context, Result};

/// Entries fetched per batch call; a bucket holding more makes the kernel answer ENOSPC,
/// and the batch is retried twice as large.
const BATCH: usize = 4096;

/// Every `(key, value)` of `map`, read at one moment per batch (a map changing meanwhile
/// may be seen partly before and partly after the change).
pub(crate) fn entries(map: &impl MapCore, name: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    match map.map_type() {
        MapType::Hash | MapType::LruHash | MapType::Array => batched(map, name),
        _ => {
            let mut out = Vec::new();
            for key in map.keys() {
                // Deleted between the key walk and the lookup: not an entry any more.
                if let Some(value) = map
                    .lookup(&key, MapFlags::ANY)
                    .context(|| format!("reading {name}"))?
                {
                    out.push((key, value));
                }
            }
            Ok(out)
        }
    }
}

/// How many entries `map` holds now.
pub(crate) fn count(map: &impl MapCore, name: &str) -> Result<u64> {
    Ok(match map.map_type() {
        MapType::Hash | MapType::LruHash => batched(map, name)?.len() as u64,
        _ => map.keys().count() as u64,
    })
}

fn batched(map: &impl MapCore, name: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let (key_size, value_size) = (map.key_size() as usize, map.value_size() as usize);
    let mut batch = BATCH;
    let mut out = Vec::new();
    // The kernel's cursor: opaque, the size of a key (at least 4 bytes for hash maps).
    let mut cursor = vec![0u8; key_size.max(4)];
    let mut started = false;
    loop {
        let mut keys = vec![0u8; batch * key_size];
        let mut values = vec![0u8; batch * value_size];
        let mut count = batch as u32;
        let mut next = vec![0u8; cursor.len()];
        let opts = libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
            ..Default::default()
        };
        // SAFETY: every buffer is valid for the sizes the kernel writes: `count` keys and
        // values of the map's sizes, and a cursor of at least a key's size.
        let ret = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                if started {
                    cursor.as_mut_ptr().cast()
                } else {
                    std::ptr::null_mut()
                },
                next.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let err = (ret < 0).then(std::io::Error::last_os_error);
        match err.as_ref().and_then(std::io::Error::raw_os_error) {
            Some(nix::libc::ENOSPC) if count == 0 => {
                batch *= 2; // one bucket holds more than a batch
                continue;
            }
            Some(nix::libc::EINTR) => continue,
            None | Some(nix::libc::ENOENT) => {}
            Some(_) => {
                return Err(err.unwrap_or_else(std::io::Error::last_os_error))
                    .context(|| format!("reading {name}"));
            }
        }
        for i in 0..count as usize {
            out.push((
                keys[i * key_size..(i + 1) * key_size].to_vec(),
                values[i * value_size..(i + 1) * value_size].to_vec(),
            ));
        }
        if err.is_some() {
            return Ok(out); // ENOENT: that was the last batch
        }
        cursor = next;
        started = true;
    }
}
