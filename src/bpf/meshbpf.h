/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ABI between the BPF programs and the Rust library, defined here once: every map
 * key and value with fixed-width types, and every constant as an enum, so that it reaches
 * Rust through the object's BTF (the skeleton generates a Rust type per enum; build.rs
 * derives the counter names). Nothing here is copied by hand into Rust.
 *
 * Changing the shape of a pinned map (its key, value or bounds) is a new layout: bump
 * MESHBPF_LAYOUT_VERSION and add the migration step from the previous one (src/migrate.rs),
 * so that `meshbpf attach` upgrades a node without a capture gap.
 */
#ifndef __MESHBPF_H
#define __MESHBPF_H

enum consts {
	MESHBPF_LAYOUT_VERSION = 10,

	/* Map bounds (documented in the book: docs/src/maps.md). */
	MAX_PODS = 16384,		/* cookie_map: registered network namespaces */
	MAX_TRACKED_CONNS = 262144,	/* origin_dst_map: captured live connections */
	MAX_POD_RULES = 262144,		/* pod_rules: per-pod port and id lists, all pods together */
	MAX_POD_CIDRS = 65536,		/* cidr_include, cidr_exclude: per-pod CIDR lists, each */
	MAX_INBOUND_PORTS = 65536,	/* inbound_ports: discovered listeners, all pods together */
	MAX_SOCKMAP_SOCKETS = 65536,	/* sock_hash: accelerated sockets (two per connection) */
	MAX_LISTENERS = 65536,		/* listeners: sidecar and dual-stack application listeners */
	MAX_POD_ADDRS = 32768,		/* pod_addrs: registered pods' own addresses, two per pod */
	MAX_COUNTERS = 128,		/* counters: room for new reasons without a new layout */
	TRACE_SLOTS = 4,		/* `meshbpf trace` readers at once, each with its ring */
	TRACE_RING_BYTES = 256 * 1024,	/* each trace ring */

	CGROUP_PATH_MAX = 256,
	NO_GID = 0xffffffff,		/* pod_settings.proxy_gid: none */
};

/* pod_settings.flags */
enum pod_flag {
	POD_F_CAPTURE_OUTBOUND = 1 << 0,
	POD_F_CAPTURE_INBOUND = 1 << 1,
	POD_F_CAPTURE_DNS = 1 << 2,
	POD_F_SOCKMAP = 1 << 3,
	POD_F_INBOUND_ALL_PORTS = 1 << 4,	/* capture every inbound port not excluded */
	POD_F_OUTBOUND_ALL_CIDRS = 1 << 5,	/* capture every destination not excluded */
	POD_F_MORE_PROXY_IDS = 1 << 6,		/* proxy uids/gids beyond the first are in pod_rules */
	/*
	 * Inbound capture (POD_F_CAPTURE_INBOUND) the way Istio's sidecar expects it: every
	 * inbound connection to a captured port goes to the sidecar's inbound listener
	 * (inbound_port), the application's binds stay as they are. Without it, inbound capture
	 * is the bind model: wildcard binds move to loopback, the sidecar owns pod_ip:PORT.
	 */
	POD_F_INBOUND_REDIRECT = 1 << 7,
	/*
	 * The pod has none of these lists: connect4/6 skip their lookups. Negative on purpose:
	 * a pod registered before these existed (value 0) is looked up, as it always was.
	 */
	POD_F_NO_OUTBOUND_EXCLUDED_PORTS = 1 << 8,
	POD_F_NO_OUTBOUND_EXCLUDED_CIDRS = 1 << 9,
	POD_F_NO_OUTBOUND_INCLUDED_PORTS = 1 << 10,
	/*
	 * Intra-node acceleration: a TCP connection between this pod's sidecar and the sidecar
	 * of another registered pod of the node with the same flag goes socket to socket,
	 * both ways, skipping both veths, the bridge and both TCP/IP stacks (sockops.bpf.c).
	 */
	POD_F_INTRA_NODE = 1 << 11,
};

/* cookie_map value: what one registered pod (network namespace) wants. */
struct pod_settings {
	__u32 proxy_uid;	/* the sidecar's uid: its sockets are never captured */
	__u32 proxy_gid;	/* the sidecar's gid, or NO_GID */
	__u16 outbound_port;	/* outbound listener, host byte order (15001) */
	__u16 inbound_port;	/* inbound listener, host byte order (15006) */
	__u16 dns_port;		/* DNS listener, host byte order (15053) */
	/*
	 * Which generation of the pod's entries in pod_rules and the CIDR tries is in force.
	 * A re-register writes the new lists under the next generation, then switches to it by
	 * updating this value (one map update), then deletes the old ones: a connection sees
	 * the old lists or the new, never a mix, and a register killed half-way leaves only
	 * unused entries behind.
	 */
	__u16 lists_gen;
	__u32 flags;		/* enum pod_flag */
	/* A captured connection is accelerated when its first message is at least this big. */
	__u32 sockmap_min_bytes;
	/* The netns's nsfs inode, for `meshbpf gc` and listings; programs do not read it. */
	__u64 netns_ino;
	/*
	 * The pod's own addresses, read at register (network byte order; 0 / :: when it has
	 * none of that family): traffic to them goes over lo, as to loopback, and a captured
	 * application socket reports them as its local address.
	 */
	__u32 pod_ip4;
	__u32 pod_ip6[4];
	__u32 _pad2;
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
	__u16 flags;		/* enum sock_flag */
};

/* sock_state.flags */
enum sock_flag {
	SOCK_F_INBOUND_COUNTED = 1 << 0,	/* counted in inbound_ports */
	SOCK_F_SOCKMAP_SENDER = 1 << 1,		/* in sock_hash, its first message not seen yet */
	SOCK_F_SOCKMAP_REDIRECT = 1 << 2,	/* its sends are redirected to its peer by sk_msg */
	SOCK_F_SOCKMAP_LEAVE = 1 << 3,		/* small first message: sockops removes it from sock_hash */
	SOCK_F_ORIGIN_PENDING = 1 << 4,		/* origin published at connect, not yet established */
	SOCK_F_PROXY_BOUND = 1 << 5,		/* bound to a port by the sidecar: its listener, if it listens */
	SOCK_F_DUAL_WILDCARD = 1 << 6,		/* its [::] bind was moved to [::1] */
	SOCK_F_INTRA_NODE = 1 << 7,		/* a sidecar's end of an intra-node connection, in sock_hash */
	SOCK_F_INTRA_NODE_PLAIN = 1 << 8,	/* ... whose first message took the normal stack: all do */
	SOCK_F_SOCKMAP_WANTED = 1 << 9,		/* its origin was published in a pod with sockmap on */
	SOCK_F_SOCKMAP_BEHIND = 1 << 10,	/* its receiver fell behind: its sends take the normal stack */
};

/* pod_rules key: one entry of one of a pod's lists; the map's value is unused (1). */
enum rule_kind {
	RULE_INBOUND_INCLUDE = 1,	/* value: a port */
	RULE_INBOUND_EXCLUDE = 2,	/* value: a port */
	RULE_OUTBOUND_INCLUDE = 3,	/* value: a port */
	RULE_OUTBOUND_EXCLUDE = 4,	/* value: a port (TCP and UDP) */
	RULE_PROXY_UID = 5,		/* value: a uid */
	RULE_PROXY_GID = 6,		/* value: a gid */
};

/*
 * A pod_rules entry of this kind (value 0, generation 0) says a register or unregister of
 * the pod is under way, or was stopped half-way: only then may the pod have list entries
 * that its pod_settings do not account for, which only a pass over the whole maps finds.
 * Written and read by the library alone; no program looks it up.
 */
enum rule_marker {
	RULE_LISTS_CHANGING = 0xff,
};

struct rule_key {
	__u64 netns_cookie;
	__u32 value;		/* host byte order */
	__u8 kind;		/* enum rule_kind */
	__u8 _pad;
	__u16 gen;		/* pod_settings.lists_gen it belongs to */
};

/*
 * cidr_include / cidr_exclude (LPM tries) key: the pod's cookie, its lists' generation,
 * then the address, IPv4 as IPv4-mapped IPv6, so one trie serves both families.
 * prefixlen counts the cookie's and the generation's bits too (CIDR_KEY_PREFIX_BITS);
 * the cookie is split in two u32 so that the data starts right after prefixlen, as an
 * LPM key's must.
 */
struct cidr_key {
	__u32 prefixlen;
	__u32 netns_cookie[2];
	__u32 gen;		/* pod_settings.lists_gen it belongs to */
	__u32 addr[4];		/* network byte order */
};

enum cidr_key_bits {
	CIDR_KEY_PREFIX_BITS = 64 + 32,	/* the cookie and the generation, before the address */
};

/*
 * listeners key: a listening socket inbound connections are handed to by the pod's
 * sk_lookup program (lookup.bpf.c).
 */
enum listener_owner {
	LISTENER_PROXY = 1,	/* the sidecar's, on `port` (in redirect mode: its inbound listener) */
	LISTENER_APP = 2,	/* an application's [::]:port moved to [::1]:port (bind mode) */
};

struct listener_key {
	__u64 netns_cookie;
	__u16 port;		/* host byte order */
	__u8 family;		/* AF_INET or AF_INET6 */
	__u8 owner;		/* enum listener_owner */
	__u32 _pad;
};

/*
 * pod_addrs key: one of a registered pod's own addresses (network byte order; IPv4 as
 * IPv4-mapped IPv6); the value is the pod's netns cookie. An address belongs to one pod.
 */
struct pod_addr_key {
	__u32 addr[4];
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

/*
 * meta_map's only value: which layout and which cgroup the pinned attachment belongs
 * to. Written by the library at attach; read by sk_msg for META_F_DRAINING. Its shape
 * never changes from one layout to the next: it is what tells which layout the rest has.
 */
enum meta_flag {
	META_F_SOCKMAP = 1 << 0,	/* attached with sockmap acceleration */
	META_F_DRAINING = 1 << 1,	/* detach under way: sk_msg redirects nothing more */
	META_F_PREORDER = 1 << 2,	/* connect/sendmsg links made with BPF_F_PREORDER (6.17+) */
};

struct mesh_meta {
	__u32 layout_version;
	__u32 flags;		/* enum meta_flag */
	__u64 cgroup_id;
	char cgroup_path[CGROUP_PATH_MAX];
};

/*
 * `meshbpf trace`: one event per decision a program takes, written to the ring of every
 * active reader (trace_ring_0..3) while trace_ctl[0], a mask of active slots, is non-zero;
 * trace_ctl[1 + slot] holds the reader's pid. With no reader, a decision costs one inlined
 * array lookup.
 */
enum trace_hook {
	TRACE_HOOK_CONNECT = 1,		/* connect4/6 */
	TRACE_HOOK_SENDMSG = 2,		/* sendmsg4/6: an unconnected datagram */
	TRACE_HOOK_BIND = 3,		/* bind4/6 */
	TRACE_HOOK_SOCKOPS = 4,		/* sockops */
	TRACE_HOOK_GETSOCKOPT = 5,	/* getsockopt: SO_ORIGINAL_DST */
	TRACE_HOOK_SK_LOOKUP = 6,	/* the pod's sk_lookup: a new inbound connection */
	TRACE_HOOK_SK_MSG = 7,		/* sk_msg: a message of an accelerated connection */
};

/* Why a program decided what it did; Rust gives each the words `trace` and `explain` print. */
enum trace_reason {
	TRACE_CAPTURED = 1,		/* to the sidecar's outbound listener */
	TRACE_CAPTURED_DNS = 2,		/* to the sidecar's DNS listener */
	TRACE_TO_INBOUND = 3,		/* the sidecar's call to its own pod: to its inbound listener */
	TRACE_SKIP_PROXY = 4,		/* the sidecar's own socket (uid/gid) */
	TRACE_SKIP_LOOPBACK = 5,	/* over lo: loopback or the pod's own address */
	TRACE_SKIP_PASSTHROUGH = 6,	/* from 127.0.0.6 / ::6 over lo */
	TRACE_SKIP_EXCLUDED_PORT = 7,	/* an excluded outbound port */
	TRACE_SKIP_EXCLUDED_CIDR = 8,	/* an excluded outbound CIDR */
	TRACE_SKIP_NOT_INCLUDED = 9,	/* outside the included CIDRs and ports */
	TRACE_SKIP_DNS_OFF = 10,	/* port 53, DNS capture off */
	TRACE_SKIP_OUTBOUND_OFF = 11,	/* outbound capture off */
	TRACE_SKIP_PROXY_PORT = 12,	/* to the outbound listener's port itself */
	TRACE_INBOUND_MOVED = 13,	/* a wildcard bind moved to loopback */
	TRACE_INBOUND_KEPT = 14,	/* a wildcard bind on an excluded or not included port */
	TRACE_ORIGIN_PUBLISHED = 15,	/* sockops: the original destination, for the sidecar */
	TRACE_SOCKMAP_ADDED = 16,	/* sockops: on the sockmap fast path */
	TRACE_ORIGIN_ANSWERED = 17,	/* getsockopt: SO_ORIGINAL_DST answered */
	TRACE_ORIGIN_MISSED = 18,	/* getsockopt: SO_ORIGINAL_DST asked, none known */
	TRACE_INBOUND_TO_PROXY = 19,	/* sk_lookup: to the sidecar's listener */
	TRACE_INBOUND_REFUSED = 20,	/* sk_lookup: no sidecar listener: refused */
	TRACE_SOCKMAP_LEFT_SMALL = 21,	/* sk_msg: a small first message: leaves the fast path */
	TRACE_SOCKMAP_LEFT_SHUTDOWN = 22, /* sockops: shut down writing: left the fast path */
	TRACE_SOCKMAP_LEFT_BEHIND = 23,	/* sk_msg: the receiver fell behind: the normal stack from now on */
};

struct decision_event {
	__u64 time_ns;		/* bpf_ktime_get_ns() */
	__u64 netns_cookie;
	__u32 pid;		/* the calling process (0 where there is none: sockops, sk_lookup) */
	__u32 uid;
	char comm[16];
	struct orig_dst dst;	/* the address asked for (or the socket's peer) */
	struct orig_dst to;	/* what it became (family 0: unchanged) */
	__u16 hook;		/* enum trace_hook */
	__u16 reason;		/* enum trace_reason */
	__u8 protocol;		/* IPPROTO_TCP / IPPROTO_UDP */
	__u8 _pad[7];
};

/*
 * Per-CPU counters, indexed by reason. The library names each after its enumerator:
 * CNT_CONNECT_REDIRECTED is `connect_redirected`. New reasons go at the end.
 */
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
	CNT_LISTENER_ADDED,
	CNT_LISTENER_ADD_FAILED,
	CNT_INBOUND_TO_PROXY,
	CNT_INBOUND_REFUSED,
	CNT_INBOUND_DUAL_STACK,
	CNT_PROXY_TO_INBOUND,
	CNT_GETSOCKNAME_RESTORED,
	CNT_TRACE_DROPPED,	/* a `meshbpf trace` reader's ring was full */
	CNT_INTRA_NODE_ADDED,
	CNT_INTRA_NODE_ADD_FAILED,
	CNT_INTRA_NODE_SKIP_FAST_OPEN,
	CNT_INTRA_NODE_MSG_REDIRECTED,
	CNT_INTRA_NODE_BYTES_REDIRECTED,
	CNT_INTRA_NODE_NO_PEER,
	CNT_SOCKMAP_RECEIVER_BEHIND,	/* a sender went back to TCP: its receiver held a receive buffer unread */
	CNT_PROXY_PEER_RESTORED,	/* the sidecar's accept/getpeername named the application's pod address */
	CNT_MAX,
};

_Static_assert((int)CNT_MAX <= (int)MAX_COUNTERS, "the counters map has no room for another reason");

#endif /* __MESHBPF_H */
