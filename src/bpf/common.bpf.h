/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Maps and helpers shared by every program. The maps are defined once, in
 * maps.bpf.c; every other object sees them as extern and the BPF static
 * linker resolves them into one set.
 */
#ifndef __COMMON_BPF_H
#define __COMMON_BPF_H

#include "vmlinux.h"
#include "meshbpf.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SOL_IPV6 41
/* SO_ORIGINAL_DST (linux/netfilter_ipv4.h) == IP6T_SO_ORIGINAL_DST */
#define SO_ORIGINAL_DST 80

/* What a cgroup sock, sock_addr or sockopt program returns to let the call go on (0 would
 * fail it with EPERM). */
#define SOCK_ALLOW 1

/* Addresses in network byte order, as the contexts hold them. */
#define LOOPBACK4 bpf_htonl(0x7f000001)		/* 127.0.0.1 */
#define PASSTHROUGH4 bpf_htonl(0x7f000006)	/* 127.0.0.6: Istio's inbound upstream source */
#define V4_MAPPED_PREFIX bpf_htonl(0x0000ffff)	/* word 2 of ::ffff:a.b.c.d */
#define LOOPBACK6_LAST bpf_htonl(1)		/* word 3 of ::1 (words 0-2 are 0) */
#define PASSTHROUGH6_LAST bpf_htonl(6)		/* word 3 of ::6, 127.0.0.6's IPv6 twin */

/*
 * The four words of an IPv6 address, Cilium's ctx_get and friends, for the addresses a program
 * holds (keys, settings, locals). A context's address fields are read and written one word at
 * a time, at a constant offset, spelled out in place: through these macros (or any copy-out
 * then compare), clang may address them from a register holding ctx + 8, a "modified ctx
 * ptr" the verifier refuses (as each handler's verifier run in the tests shows).
 */
#define IP6_GET(dst, src)                                                                          \
	do {                                                                                       \
		(dst)[0] = (src)[0];                                                               \
		(dst)[1] = (src)[1];                                                               \
		(dst)[2] = (src)[2];                                                               \
		(dst)[3] = (src)[3];                                                               \
	} while (0)
#define IP6_EQ(a, b) ((a)[0] == (b)[0] && (a)[1] == (b)[1] && (a)[2] == (b)[2] && (a)[3] == (b)[3])
/* Whether an address is ::N, for the last word given. */
#define IP6_IS_LOW(a, last) ((a)[0] == 0 && (a)[1] == 0 && (a)[2] == 0 && (a)[3] == (last))
/* Whether an address is set (a pod's IPv6 address is all zeros when it has none). */
#define IP6_IS_SET(a) ((a)[0] | (a)[1] | (a)[2] | (a)[3])

#ifdef MESHBPF_DEFINE_MAPS
#define MESHBPF_MAP
#else
#define MESHBPF_MAP extern
#endif

MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__type(key, __u64);
	__type(value, struct pod_settings);
} cookie_map SEC(".maps");

/* Lives and dies with the socket: no cleanup needed. */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} sk_storage_map SEC(".maps");

/*
 * Entries are removed when the proxy's end of the connection closes (see
 * sockops.bpf.c); LRU eviction is only the backstop for connections whose
 * proxy end never existed.
 */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_TRACKED_CONNS);
	__type(key, struct conn_key);
	__type(value, struct orig_dst);
} origin_dst_map SEC(".maps");

/*
 * Both ends of each accelerated connection, keyed by 4-tuple (src = the
 * socket's own end) plus a cookie. A loopback connection's is its pod's netns
 * cookie, so that pods using the same loopback 4-tuple never collide. An
 * intra-node connection's (sidecar to sidecar, across two pods) is 0, which no
 * netns has: its two ends live in two namespaces, and what keeps its keys
 * apart from every other's is that each end's local address is its own pod's,
 * held by no other pod (pod_addrs). A socket leaves it when it closes.
 */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKMAP_SOCKETS);
	__type(key, struct conn_key);
	__type(value, __u64);
} sock_hash SEC(".maps");

MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Written by the library at register time; replaced as a whole on re-register (lists_gen). */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_POD_RULES);
	__type(key, struct rule_key);
	__type(value, __u8);
} pod_rules SEC(".maps");

/* Per-pod outbound CIDR lists (LPM tries need BPF_F_NO_PREALLOC). */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_POD_CIDRS);
	__type(key, struct cidr_key);
	__type(value, __u8);
} cidr_include SEC(".maps");

MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_POD_CIDRS);
	__type(key, struct cidr_key);
	__type(value, __u8);
} cidr_exclude SEC(".maps");

/*
 * Listening sockets the pods' sk_lookup programs hand inbound connections to, added by
 * sockops when they listen; a socket leaves it when it closes.
 */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_LISTENERS);
	__type(key, struct listener_key);
	__type(value, __u64);
} listeners SEC(".maps");

/*
 * Registered pods' own addresses, to their netns cookie: written at register, removed at
 * unregister; an address registered by a second pod stays with the newer namespace.
 */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_POD_ADDRS);
	__type(key, struct pod_addr_key);
	__type(value, __u64);
} pod_addrs SEC(".maps");

/* Listener counts: incremented after a moved bind succeeds, decremented at socket release. */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_INBOUND_PORTS);
	__type(key, struct inbound_key);
	__type(value, __u32);
} inbound_ports SEC(".maps");

MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mesh_meta);
} meta_map SEC(".maps");

/* trace_ctl[0]: the mask of active trace slots; trace_ctl[1 + slot]: its reader's pid. */
MESHBPF_MAP struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1 + TRACE_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} trace_ctl SEC(".maps");

#define TRACE_RING(name)                                                                           \
	MESHBPF_MAP struct {                                                                       \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                                                \
		__uint(max_entries, TRACE_RING_BYTES);                                             \
	} name SEC(".maps")
TRACE_RING(trace_ring_0);
TRACE_RING(trace_ring_1);
TRACE_RING(trace_ring_2);
TRACE_RING(trace_ring_3);

/* The active trace slots: 0 when nobody traces (an array lookup, inlined by the verifier). */
static __always_inline __u32 trace_slots(void)
{
	__u32 zero = 0;
	__u32 *mask = bpf_map_lookup_elem(&trace_ctl, &zero);

	return mask ? *mask : 0;
}

static __always_inline void count_n(enum counter reason, __u64 n)
{
	__u32 key = reason;
	__u64 *val = bpf_map_lookup_elem(&counters, &key);

	if (val)
		*val += n;
}

static __always_inline void count(enum counter reason)
{
	count_n(reason, 1);
}

/*
 * A reader is woken only once a batch waits in its ring: a wakeup is an interrupt (a
 * self-IPI, which a virtual machine pays as an exit) and cost more than the rest of the
 * event together, once per decision (measured: connect4 1.1 -> 9.9 us per call while a
 * trace read). A reader drains its ring every TRACE_DRAIN anyway (trace.rs), so a lone
 * decision is shown that much later, never lost.
 */
#define TRACE_WAKEUP_BYTES (TRACE_RING_BYTES / 16)

static __always_inline long trace_output(void *ring, struct decision_event *ev)
{
	__u64 flags = bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA) >= TRACE_WAKEUP_BYTES
			      ? BPF_RB_FORCE_WAKEUP
			      : BPF_RB_NO_WAKEUP;

	return bpf_ringbuf_output(ring, ev, sizeof(*ev), flags);
}

/* An event for every active reader; a full ring drops it, counted in trace_dropped. */
static __always_inline void trace_emit(struct decision_event *ev, __u32 slots)
{
	__u64 dropped = 0;

	if ((slots & 1) && trace_output(&trace_ring_0, ev))
		dropped++;
	if ((slots & 2) && trace_output(&trace_ring_1, ev))
		dropped++;
	if ((slots & 4) && trace_output(&trace_ring_2, ev))
		dropped++;
	if ((slots & 8) && trace_output(&trace_ring_3, ev))
		dropped++;
	if (dropped)
		count_n(CNT_TRACE_DROPPED, dropped);
}

/*
 * One decision, if anybody traces. `task`: called in the process's own context (sock_addr,
 * sockopt), whose pid, uid and comm are recorded.
 */
static __always_inline void trace(__u16 hook, __u16 reason, __u64 netns_cookie, __u8 protocol,
				  const struct orig_dst *dst, const struct orig_dst *to, bool task)
{
	__u32 slots = trace_slots();
	struct decision_event ev;

	if (!slots)
		return;
	__builtin_memset(&ev, 0, sizeof(ev));
	ev.time_ns = bpf_ktime_get_ns();
	ev.netns_cookie = netns_cookie;
	ev.hook = hook;
	ev.reason = reason;
	ev.protocol = protocol;
	if (dst)
		ev.dst = *dst;
	if (to)
		ev.to = *to;
	if (task) {
		ev.pid = bpf_get_current_pid_tgid() >> 32;
		ev.uid = (__u32)bpf_get_current_uid_gid();
		bpf_get_current_comm(ev.comm, sizeof(ev.comm));
	}
	trace_emit(&ev, slots);
}

/* Whether `value` is in one of the pod's lists (those of its current generation). */
static __always_inline bool pod_rule(const struct pod_settings *pod, __u64 netns_cookie,
				     __u32 value, enum rule_kind kind)
{
	struct rule_key key = {
		.netns_cookie = netns_cookie,
		.value = value,
		.kind = kind,
		.gen = pod->lists_gen,
	};

	return bpf_map_lookup_elem(&pod_rules, &key) != NULL;
}

/* Whether `addr` (IPv4 in addr[0], or IPv6) falls in one of the pod's prefixes in `trie`. */
static __always_inline bool in_cidrs(void *trie, const struct pod_settings *pod,
				     __u64 netns_cookie, bool v6, const __u32 addr[4])
{
	struct cidr_key key = {
		.prefixlen = CIDR_KEY_PREFIX_BITS + 128,
		.netns_cookie = { (__u32)netns_cookie, (__u32)(netns_cookie >> 32) },
		.gen = pod->lists_gen,
	};

	if (v6) {
		IP6_GET(key.addr, addr);
	} else {
		key.addr[2] = V4_MAPPED_PREFIX;
		key.addr[3] = addr[0];
	}
	return bpf_map_lookup_elem(trie, &key) != NULL;
}

/* Whether inbound connections to `port` are the sidecar's (its lists: include, exclude). */
static __always_inline bool inbound_port_captured(const struct pod_settings *pod, __u64 cookie,
						  __u16 port)
{
	if (pod_rule(pod, cookie, port, RULE_INBOUND_EXCLUDE))
		return false;
	if (pod->flags & POD_F_INBOUND_ALL_PORTS)
		return true;
	return pod_rule(pod, cookie, port, RULE_INBOUND_INCLUDE);
}

static __always_inline struct pod_settings *lookup_pod(__u64 netns_cookie)
{
	return bpf_map_lookup_elem(&cookie_map, &netns_cookie);
}

/*
 * The sidecar by uid only: istio-iptables sends a caller over lo to the inbound
 * listener by --uid-owner; by --gid-owner alone it never does (its
 * `-o lo ! --uid-owner 1337 -j RETURN` comes first).
 */
static __always_inline bool is_proxy_uid(const struct pod_settings *pod, __u64 netns_cookie)
{
	__u32 uid = (__u32)bpf_get_current_uid_gid();

	return uid == pod->proxy_uid || ((pod->flags & POD_F_MORE_PROXY_IDS) &&
					 pod_rule(pod, netns_cookie, uid, RULE_PROXY_UID));
}

/*
 * Sockets of the sidecar (by uid or gid) are never captured: that is what
 * keeps it loop-free. The first uid and gid sit in the pod's settings; more,
 * rarely, in pod_rules.
 */
static __always_inline bool is_proxy(const struct pod_settings *pod, __u64 netns_cookie)
{
	__u64 ugid = bpf_get_current_uid_gid();
	__u32 uid = (__u32)ugid, gid = ugid >> 32;

	if (uid == pod->proxy_uid || (pod->proxy_gid != NO_GID && gid == pod->proxy_gid))
		return true;
	return (pod->flags & POD_F_MORE_PROXY_IDS) &&
	       (pod_rule(pod, netns_cookie, uid, RULE_PROXY_UID) ||
		pod_rule(pod, netns_cookie, gid, RULE_PROXY_GID));
}

/*
 * Whether `port` (host order) is one of the pod's sidecar listeners: the only peer a
 * socket whose connect was captured can have. Checked before its original destination is
 * published or shown, so that nothing kept from an earlier connect of the same socket is
 * ever attributed to another peer.
 */
static __always_inline bool is_sidecar_port(const struct pod_settings *pod, __u16 port)
{
	return port == pod->outbound_port || port == pod->dns_port || port == pod->inbound_port;
}

static __always_inline bool is_loopback4(__u32 addr_be)
{
	return (bpf_ntohl(addr_be) >> 24) == 127;
}

#define DNS_PORT 53

/* BPF_F_CURRENT_NETNS (-1): a #define in older kernels' uapi, so absent from their BTF
 * (Debian 12's arm64 vmlinux.h); an enum in newer ones. Spelled out once here. */
#define LOOKUP_CURRENT_NETNS ((__u64)-1)

static __always_inline bool is_v4_mapped(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_PREFIX;
}

/* The loopback address a redirected IPv6 socket talks to: ::1, or ::ffff:127.0.0.1 for an
 * IPv4-mapped destination (the sidecar's IPv4 listener). */
static __always_inline void proxy_addr6(__u32 out[4], bool mapped)
{
	out[0] = 0;
	out[1] = 0;
	out[2] = mapped ? V4_MAPPED_PREFIX : 0;
	out[3] = mapped ? LOOPBACK4 : LOOPBACK6_LAST;
}

static __always_inline bool is_loopback6(const __u32 addr[4])
{
	if (is_v4_mapped(addr))
		return is_loopback4(addr[3]);
	return IP6_IS_LOW(addr, LOOPBACK6_LAST);
}

/* Fold an IPv4-mapped IPv6 pair into the IPv4 form both ends of the connection agree on. */
static __always_inline void conn_key_normalize(struct conn_key *key)
{
	if (key->family != AF_INET6 || !is_v4_mapped(key->src_addr) ||
	    !is_v4_mapped(key->dst_addr))
		return;
	key->family = AF_INET;
	key->src_addr[0] = key->src_addr[3];
	key->dst_addr[0] = key->dst_addr[3];
	key->src_addr[2] = key->src_addr[3] = 0;
	key->dst_addr[2] = key->dst_addr[3] = 0;
}

static __always_inline void orig_dst_normalize(struct orig_dst *dst)
{
	if (dst->family != AF_INET6 || !is_v4_mapped(dst->addr))
		return;
	dst->family = AF_INET;
	dst->addr[0] = dst->addr[3];
	dst->addr[2] = dst->addr[3] = 0;
}

/*
 * The original destination of the captured TCP connection whose proxy end is `sk` (the
 * sidecar's accepted socket), as sockops published it from the application's end.
 */
static __always_inline struct orig_dst *accepted_origin(struct bpf_sock *sk, __u64 netns_cookie)
{
	struct conn_key key = {};

	/* The accepted socket's peer is the application: it is the key's source. */
	key.family = sk->family;
	key.src_port = sk->dst_port;
	key.dst_port = bpf_htons((__u16)sk->src_port);
	if (sk->family == AF_INET) {
		key.src_addr[0] = sk->dst_ip4;
		key.dst_addr[0] = sk->src_ip4;
	} else {
		key.src_addr[0] = sk->dst_ip6[0];
		key.src_addr[1] = sk->dst_ip6[1];
		key.src_addr[2] = sk->dst_ip6[2];
		key.src_addr[3] = sk->dst_ip6[3];
		key.dst_addr[0] = sk->src_ip6[0];
		key.dst_addr[1] = sk->src_ip6[1];
		key.dst_addr[2] = sk->src_ip6[2];
		key.dst_addr[3] = sk->src_ip6[3];
	}
	key.netns_cookie = netns_cookie;
	conn_key_normalize(&key);
	return bpf_map_lookup_elem(&origin_dst_map, &key);
}

/*
 * Puts the original destination kept on ctx's socket back into ctx's address
 * (getpeername, a DNS reply's source), when the socket has one of ctx's
 * family; returns whether it did.
 */
static __always_inline bool restore_orig_dst4(struct bpf_sock_addr *ctx)
{
	struct sock_state *state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);

	if (!state || state->dst.family != AF_INET)
		return false;
	ctx->user_ip4 = state->dst.addr[0];
	ctx->user_port = state->dst.port;
	return true;
}

/*
 * The IPv6 form: an IPv4 destination kept on a dual-stack socket (its sendto() to an
 * IPv4-mapped address went through the IPv4 hooks, udpv6_sendmsg() handing it to
 * udp_sendmsg()) comes back IPv4-mapped, as the application wrote it.
 */
static __always_inline bool restore_orig_dst6(struct bpf_sock_addr *ctx)
{
	struct sock_state *state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);

	if (!state)
		return false;
	if (state->dst.family == AF_INET6) {
		ctx->user_ip6[0] = state->dst.addr[0];
		ctx->user_ip6[1] = state->dst.addr[1];
		ctx->user_ip6[2] = state->dst.addr[2];
		ctx->user_ip6[3] = state->dst.addr[3];
	} else if (state->dst.family == AF_INET) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = V4_MAPPED_PREFIX;
		ctx->user_ip6[3] = state->dst.addr[0];
	} else {
		return false;
	}
	ctx->user_port = state->dst.port;
	return true;
}

#endif /* __COMMON_BPF_H */
