/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ABI between the BPF programs and the Rust library: every map key and
 * value, defined once, with fixed-width types. src/abi.rs mirrors each struct
 * with a compile-time size check; change both together and bump
 * MESHBPF_LAYOUT_VERSION when a pinned map's layout changes.
 */
#ifndef __MESHBPF_H
#define __MESHBPF_H

#define MESHBPF_LAYOUT_VERSION 1

/* Map bounds (documented in the README). */
#define MAX_PODS 16384		/* cookie_map: registered network namespaces */
#define MAX_TRACKED_CONNS 262144 /* origin_dst_map: captured live connections */

/* pod_settings.flags */
#define POD_F_CAPTURE_OUTBOUND (1U << 0)
#define POD_F_CAPTURE_INBOUND (1U << 1)
#define POD_F_CAPTURE_DNS (1U << 2)
#define POD_F_SOCKMAP (1U << 3)

#define NO_GID 0xffffffffU

/* cookie_map value: what one registered pod (network namespace) wants. */
struct pod_settings {
	__u32 proxy_uid;	/* the sidecar's uid: its sockets are never captured */
	__u32 proxy_gid;	/* the sidecar's gid, or NO_GID */
	__u16 outbound_port;	/* outbound listener, host byte order (15001) */
	__u16 inbound_port;	/* inbound listener, host byte order (15006) */
	__u16 dns_port;		/* DNS listener, host byte order (15053) */
	__u16 _pad;
	__u32 flags;		/* POD_F_* */
};

/* An address as the application asked for it. */
struct orig_dst {
	__u32 addr[4];		/* network byte order; IPv4 in addr[0] */
	__u16 port;		/* network byte order */
	__u16 family;		/* AF_INET or AF_INET6 */
};

/*
 * origin_dst_map key: one captured connection seen from the application's
 * side (src = application, dst = proxy listener). IPv4 (including IPv4-mapped
 * IPv6) uses addr[0] and family AF_INET, so a v6 socket talking to a v4
 * listener yields the same key from both ends.
 */
struct conn_key {
	__u32 src_addr[4];
	__u32 dst_addr[4];
	__u16 src_port;		/* network byte order */
	__u16 dst_port;		/* network byte order */
	__u32 family;
	__u64 netns_cookie;
};

#define CGROUP_PATH_MAX 256

/*
 * meta_map's only value: which layout and which cgroup the pinned attachment
 * belongs to. Written by the library at attach; never read by a program.
 */
struct mesh_meta {
	__u32 layout_version;
	__u32 _pad;
	__u64 cgroup_id;
	char cgroup_path[CGROUP_PATH_MAX];
};

/* Per-CPU counters, indexed by reason. Names live in src/abi.rs. */
enum counter {
	CNT_CONNECT_REDIRECTED,
	CNT_SKIP_PROXY_UID,
	CNT_SKIP_LOOPBACK,
	CNT_SKIP_PROXY_PORT,
	CNT_STORAGE_FAILED,
	CNT_ORIGIN_RECORDED,
	CNT_ORIGIN_UPDATE_FAILED,
	CNT_ORIGIN_REMOVED,
	CNT_GETSOCKOPT_ANSWERED,
	CNT_GETSOCKOPT_MISS,
	CNT_GETPEERNAME_RESTORED,
	CNT_MAX,
};

#endif /* __MESHBPF_H */
