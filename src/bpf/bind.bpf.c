// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Inbound capture: an application's wildcard bind (0.0.0.0:80, [::]:80) in a
 * registered pod is moved to loopback, so that only the sidecar, which owns
 * pod_ip:80, can reach it from outside — istio-iptables' inbound REDIRECT,
 * done once per bind instead of once per packet.
 *
 * The non-root sidecar may bind privileged ports in its own pod: since Linux
 * 5.12 ("bpf: Allow rewriting to ports under ip_unprivileged_port_start") a
 * bind program returning 3 lets that one bind skip the CAP_NET_BIND_SERVICE
 * check, so no node-wide or pod-wide sysctl is needed.
 *
 * Moved binds are counted per pod and port in inbound_ports (after the bind
 * succeeded, until the socket is released): that is inbound listener
 * discovery, which tells the sidecar which inbound listeners to open.
 */
#include "common.bpf.h"
#include <bpf/bpf_core_read.h>

/* Return value of a bind program: allow, and skip the privileged-port check. */
#define BIND_ALLOW_NO_CAP_NET_BIND_SERVICE 3

/* A wildcard bind's fate, for `meshbpf trace` (the address: the family's wildcard). */
static __always_inline void trace_bind(struct bpf_sock_addr *ctx, __u64 cookie,
				       enum trace_reason reason)
{
	struct orig_dst dst = { .port = ctx->user_port, .family = ctx->family };

	trace(TRACE_HOOK_BIND, reason, cookie, ctx->protocol, &dst, NULL, true);
}

/*
 * Common part of bind4/bind6 once the address is known to be the wildcard:
 * returns true when the bind must move to loopback (and marks the socket).
 */
static __always_inline bool capture_bind(struct bpf_sock_addr *ctx, const struct pod_settings *pod,
					 __u64 cookie)
{
	__u16 port = bpf_ntohs(ctx->user_port);
	struct sock_state *state;

	/* UDP services are not proxied inbound (the sidecar speaks TCP), and port 0 is an
	 * ephemeral bind before connect, not a listener. In redirect mode binds stay. */
	if ((pod->flags & (POD_F_CAPTURE_INBOUND | POD_F_INBOUND_REDIRECT)) != POD_F_CAPTURE_INBOUND ||
	    ctx->protocol != IPPROTO_TCP || port == 0)
		return false;
	if (!inbound_port_captured(pod, cookie, port)) {
		count(CNT_BIND_SKIP_PORT);
		trace_bind(ctx, cookie, TRACE_INBOUND_KEPT);
		return false;
	}
	state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		count(CNT_STORAGE_FAILED);
		return false;
	}
	state->inbound_port = port;
	count(CNT_BIND_REDIRECTED);
	trace_bind(ctx, cookie, TRACE_INBOUND_MOVED);
	return true;
}

/*
 * A bind that is not moved must not be counted as a moved one: an earlier bind of the same
 * socket may have been moved and failed (EADDRINUSE), leaving its port behind.
 */
static __always_inline int keep_bind(struct bpf_sock_addr *ctx)
{
	struct sock_state *state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);

	if (state && !(state->flags & SOCK_F_INBOUND_COUNTED)) {
		state->inbound_port = 0;
		state->flags &= ~SOCK_F_DUAL_WILDCARD;
	}
	return SOCK_ALLOW;
}

/*
 * The sidecar's bind (or root's of the inbound port, root_binds_inbound_port). In a pod with
 * inbound capture its sockets bound to a port are marked:
 * if one listens, sockops adds it to `listeners`, where the pod's sk_lookup program hands
 * it the pod's inbound connections (and no application socket gets them).
 */
static __always_inline int proxy_bind(struct bpf_sock_addr *ctx, const struct pod_settings *pod)
{
	__u16 port = bpf_ntohs(ctx->user_port);
	struct sock_state *state;

	if (port == 0)
		return SOCK_ALLOW;
	if ((pod->flags & POD_F_CAPTURE_INBOUND) && ctx->protocol == IPPROTO_TCP) {
		state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (state)
			state->flags |= SOCK_F_PROXY_BOUND;
	}
	if (port >= 1024)
		return SOCK_ALLOW;
	count(CNT_BIND_PROXY_PRIVILEGED);
	return BIND_ALLOW_NO_CAP_NET_BIND_SERVICE;
}

/*
 * Redirect mode: root binding the inbound port binds the sidecar's inbound listener. A proxy
 * that binds as root and then drops to the proxy uid (HAProxy's `uid`/`gid`: socket(),
 * bind(), listen(), then setgid(), setuid(), measured with strace on HAProxy 2.6) is root at
 * bind and at listen, and its socket stays root's (sk_uid is fixed at socket()), so nothing
 * the kernel keeps about it says "proxy" before its first accept. Root may, for a process
 * that may setuid() to the proxy uid gains nothing it could not have by binding as that uid;
 * an application's uid never may (istio-iptables' REDIRECT hands 15006 to any owner).
 */
static __always_inline bool root_binds_inbound_port(struct bpf_sock_addr *ctx,
						    const struct pod_settings *pod)
{
	return (pod->flags & (POD_F_CAPTURE_INBOUND | POD_F_INBOUND_REDIRECT)) ==
		       (POD_F_CAPTURE_INBOUND | POD_F_INBOUND_REDIRECT) &&
	       ctx->protocol == IPPROTO_TCP && bpf_ntohs(ctx->user_port) == pod->inbound_port &&
	       (__u32)bpf_get_current_uid_gid() == 0;
}

/* Whether the IPv6 socket being bound takes IPv6 only (IPV6_V6ONLY); unknown counts as yes. */
static __always_inline bool v6only(struct bpf_sock_addr *ctx)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(ctx->sk);

	return !tp || BPF_CORE_READ_BITFIELD(&tp->inet_conn.icsk_inet.sk.__sk_common, skc_ipv6only);
}

static __always_inline void mark_dual_wildcard(struct bpf_sock_addr *ctx)
{
	struct sock_state *state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);

	if (state)
		state->flags |= SOCK_F_DUAL_WILDCARD;
}

/* What bind4 and bind6 decide alike: a verdict, or BIND_MOVE for a bind to move to loopback. */
#define BIND_MOVE (-1)
static __always_inline int bind_verdict(struct bpf_sock_addr *ctx, bool wildcard)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_settings *pod = lookup_pod(cookie);

	if (!pod)
		return SOCK_ALLOW;
	if (is_proxy(pod, cookie) || root_binds_inbound_port(ctx, pod))
		return proxy_bind(ctx, pod);
	if (!wildcard || !capture_bind(ctx, pod, cookie))
		return keep_bind(ctx);
	return BIND_MOVE;
}

SEC("cgroup/bind4")
int handle__bind4(struct bpf_sock_addr *ctx)
{
	int verdict = bind_verdict(ctx, ctx->user_ip4 == 0);

	if (verdict != BIND_MOVE)
		return verdict;
	ctx->user_ip4 = LOOPBACK4;
	return SOCK_ALLOW;
}

SEC("cgroup/bind6")
int handle__bind6(struct bpf_sock_addr *ctx)
{
	/* Word by word in the condition: see IP6_GET. */
	int verdict = bind_verdict(ctx, !(ctx->user_ip6[0] || ctx->user_ip6[1] ||
					  ctx->user_ip6[2] || ctx->user_ip6[3]));

	if (verdict != BIND_MOVE)
		return verdict;
	/*
	 * A dual-stack [::] answers both families, but a socket has one address, and one bound
	 * to ::1 is IPv6-only (inet6_bind sets it). So it moves to ::ffff:127.0.0.1, which
	 * takes IPv4 over lo; the pod's sk_lookup program hands it IPv6 over lo to [::1]:PORT.
	 */
	if (v6only(ctx)) {
		ctx->user_ip6[3] = LOOPBACK6_LAST;
	} else {
		ctx->user_ip6[2] = V4_MAPPED_PREFIX;
		ctx->user_ip6[3] = LOOPBACK4;
		mark_dual_wildcard(ctx);
	}
	return SOCK_ALLOW;
}

/* After a moved bind succeeded: count the listener once. */
static __always_inline void count_listener(struct bpf_sock *sk)
{
	struct inbound_key key = {};
	struct sock_state *state;
	__u32 one = 1, *listeners;

	state = bpf_sk_storage_get(&sk_storage_map, sk, 0, 0);
	if (!state || !state->inbound_port || (state->flags & SOCK_F_INBOUND_COUNTED) ||
	    sk->src_port != state->inbound_port)
		return;
	key.netns_cookie = bpf_get_netns_cookie(sk);
	key.port = state->inbound_port;
	listeners = bpf_map_lookup_elem(&inbound_ports, &key);
	if (listeners)
		__sync_fetch_and_add(listeners, 1);
	else if (bpf_map_update_elem(&inbound_ports, &key, &one, BPF_NOEXIST))
		return; /* full, or raced with another first listener: not counted */
	state->flags |= SOCK_F_INBOUND_COUNTED;
}

SEC("cgroup/post_bind4")
int handle__post_bind4(struct bpf_sock *sk)
{
	count_listener(sk);
	return SOCK_ALLOW;
}

SEC("cgroup/post_bind6")
int handle__post_bind6(struct bpf_sock *sk)
{
	count_listener(sk);
	return SOCK_ALLOW;
}

/*
 * The listener is gone. The entry stays at zero rather than being deleted:
 * deleting could race with a new listener of the same port (a graceful
 * restart with SO_REUSEPORT) and lose its count. The library ignores zeros
 * and removes a pod's entries when the pod is unregistered.
 */
SEC("cgroup/sock_release")
int handle__sock_release(struct bpf_sock *sk)
{
	struct inbound_key key = {};
	struct sock_state *state;
	__u32 *listeners;

	state = bpf_sk_storage_get(&sk_storage_map, sk, 0, 0);
	if (!state || !(state->flags & SOCK_F_INBOUND_COUNTED))
		return SOCK_ALLOW;
	key.netns_cookie = bpf_get_netns_cookie(sk);
	key.port = state->inbound_port;
	listeners = bpf_map_lookup_elem(&inbound_ports, &key);
	if (listeners && *listeners > 0)
		__sync_fetch_and_add(listeners, -1);
	return SOCK_ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
