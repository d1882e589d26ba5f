/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ABI between the BPF programs and the Rust library: every map key and
 * value, defined once, with fixed-width types. src/abi.rs mirrors each struct
 * with a compile-time size check; change both together and bump
 * MESHBPF_LAYOUT_VERSION when a pinned map's layout changes.
 */
#ifndef __MESHBPF_H
#define __MESHBPF_H

#define MESHBPF_LAYOUT_VERSION 7

/* Map bounds (documented in the README). */
#define MAX_PODS 16384		/* cookie_map: registered network namespaces */
#define MAX_TRACKED_CONNS 262144 /* origin_dst_map: captured live connections */
#define MAX_POD_RULES 65536	/* pod_rules: per-pod port and id lists, all pods together */
#define MAX_POD_CIDRS 65536	/* cidr_include, cidr_exclude: per-pod CIDR lists, each */
#define MAX_INBOUND_PORTS 65536	/* inbound_ports: discovered listeners, all pods together */
#define MAX_SOCKMAP_SOCKETS 65536 /* sock_hash: accelerated loopback sockets (two per connection) */

/* pod_settings.flags */
#define POD_F_CAPTURE_OUTBOUND (1U << 0)
#define POD_F_CAPTURE_INBOUND (1U << 1)
#define POD_F_CAPTURE_DNS (1U << 2)
#define POD_F_SOCKMAP (1U << 3)
#define POD_F_INBOUND_ALL_PORTS (1U << 4) /* capture every inbound port not excluded */
#define POD_F_OUTBOUND_ALL_CIDRS (1U << 5) /* capture every destination not excluded */
#define POD_F_MORE_PROXY_IDS (1U << 6) /* proxy uids/gids beyond the first are in pod_rules */

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
	/* A captured connection is accelerated when its first message is at least this big. */
	__u32 sockmap_min_bytes;
	/* The netns's nsfs inode, for `meshbpf gc` and listings; programs do not read it. */
	__u64 netns_ino;
};

/* An address as the application asked for it. */
struct orig_dst {
	__u32 addr[4];		/* network byte order; IPv4 in addr[0] */
	__u16 port;		/* network byte order */
	__u16 family;		/* AF_INET or AF_INET6 */
};

/* sk_storage_map value: what meshbpf did to one socket. */
struct sock_state {
	struct orig_dst dst;	/* family 0: the socket's connect was not captured */
	/* On the sidecar's DNS socket: the original server of the datagram it received last. */
	struct orig_dst query_dst;
	__u16 inbound_port;	/* host order; non-zero: its wildcard bind was moved to loopback */
	__u16 flags;		/* SOCK_F_* */
};

#define SOCK_F_INBOUND_COUNTED (1U << 0) /* counted in inbound_ports */
#define SOCK_F_SOCKMAP_SENDER (1U << 1)	 /* in sock_hash, its first message not seen yet */
#define SOCK_F_SOCKMAP_REDIRECT (1U << 2) /* its sends are redirected to its peer by sk_msg */
#define SOCK_F_SOCKMAP_LEAVE (1U << 3)	  /* small first message: sockops removes it from sock_hash */

/* pod_rules key: one entry of one of a pod's lists; the map's value is unused (1). */
enum rule_kind {
	RULE_INBOUND_INCLUDE = 1,	/* value: a port */
	RULE_INBOUND_EXCLUDE = 2,	/* value: a port */
	RULE_OUTBOUND_INCLUDE = 3,	/* value: a port */
	RULE_OUTBOUND_EXCLUDE = 4,	/* value: a port (TCP and UDP) */
	RULE_PROXY_UID = 5,		/* value: a uid */
	RULE_PROXY_GID = 6,		/* value: a gid */
};

struct rule_key {
	__u64 netns_cookie;
	__u32 value;		/* host byte order */
	__u8 kind;		/* enum rule_kind */
	__u8 _pad[3];
};

/*
 * cidr_include / cidr_exclude (LPM tries) key: the pod's cookie then the
 * address, IPv4 as IPv4-mapped IPv6, so one trie serves both families.
 * prefixlen counts the cookie's 64 bits too; the cookie is split in two u32
 * so that the data starts right after prefixlen, as an LPM key's must.
 */
struct cidr_key {
	__u32 prefixlen;
	__u32 netns_cookie[2];
	__u32 addr[4];		/* network byte order */
};

/* inbound_ports key: a port an application of a pod listens on (moved to loopback). */
struct inbound_key {
	__u64 netns_cookie;
	__u16 port;		/* host byte order */
	__u16 _pad[3];
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
#define META_F_SOCKMAP (1U << 0) /* attached with sockmap acceleration */
#define META_F_DRAINING (1U << 1) /* detach under way: sk_msg redirects nothing more */

struct mesh_meta {
	__u32 layout_version;
	__u32 flags;		/* META_F_* */
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
	CNT_BIND_REDIRECTED,
	CNT_BIND_SKIP_PORT,
	CNT_BIND_PROXY_PRIVILEGED,
	CNT_DNS_REDIRECTED,
	CNT_DNS_REPLY_RESTORED,
	CNT_DNS_QUERY_ORIGIN_FOUND,
	CNT_DNS_QUERY_ORIGIN_MISS,
	CNT_SOCKMAP_ADDED,
	CNT_SOCKMAP_ADD_FAILED,
	CNT_SOCKMAP_MSG_REDIRECTED,
	CNT_SOCKMAP_BYTES_REDIRECTED,
	CNT_SOCKMAP_MSG_NO_PEER,
	CNT_SOCKMAP_LEFT_ON_SHUTDOWN,
	CNT_SOCKMAP_LEFT_SMALL_FIRST_MSG,
	CNT_SKIP_EXCLUDED_PORT,
	CNT_SKIP_EXCLUDED_CIDR,
	CNT_SKIP_NOT_INCLUDED,
	CNT_MAX,
};

#endif /* __MESHBPF_H */
