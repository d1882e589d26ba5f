// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Inbound capture where the pod's network namespace looks up the socket for a new
 * connection (sk_lookup, Linux 5.9): decided once per connection, before any socket is
 * chosen, so no application listener can be reached around the sidecar.
 *
 * - Redirect mode (Istio's): a connection to any captured port goes to the sidecar's
 *   inbound listener (inbound_port, 15006), which accepts it with the original pod_ip:PORT
 *   as its local address; the applications' binds stay as they are.
 * - Bind mode (the article's): a connection to a captured port goes to the sidecar's
 *   listener on that port; with none, it is refused. That closes what moving wildcard
 *   binds to loopback cannot: ephemeral-port listeners, listen() without bind, binds to the
 *   pod's own address. And IPv6 over lo to [::1]:PORT reaches an application's dual-stack
 *   [::]:PORT, moved to ::ffff:127.0.0.1:PORT (a socket has one address).
 * In both, the pod's own traffic over lo (from 127.0.0.6, the sidecar's inbound upstream,
 * and every loopback call) and excluded ports take the ordinary lookup; with no listener
 * to take a captured connection it is refused, as REDIRECT to a closed port would be.
 *
 * This program type may not ask for its netns cookie (the 6.18 verifier refuses
 * bpf_get_netns_cookie here), so each registered pod gets its own copy with the cookie set
 * before load.
 */
/*
 * Loaded once per registered pod (the pod's cookie is a constant of its copy): the context
 * is UAPI, at fixed offsets, so no CO-RE relocation is needed, and without one libbpf never
 * parses the kernel's BTF for this object, which was most of `register`'s time.
 */
#define BPF_NO_PRESERVE_ACCESS_INDEX
#define MESHBPF_DEFINE_MAPS
#include "common.bpf.h"

/* The pod this copy serves; set before load. */
const volatile __u64 pod_cookie = 0;

/*
 * A connection the pod makes to itself: to a loopback address, from a loopback address
 * (Envoy's passthrough 127.0.0.6 / ::6 among them) or from one of the pod's own addresses.
 * Not the ingress interface: a connection to the pod's own address arrives over lo but
 * reports the interface that address is on. A loopback destination comes from the pod
 * whatever the source: the kernel drops 127.0.0.0/8 and ::1 arriving on any other
 * interface (ip_route_input_slow()'s martian destination, ipv6_rcv()); an application
 * bound to an address of its pod that `register` never saw (a second one on eth0), whose
 * connect4/6 sent it to the sidecar's outbound listener, comes from there.
 */
static __always_inline bool from_the_pod(struct bpf_sk_lookup *ctx, const struct pod_settings *pod)
{
	if (ctx->family == AF_INET)
		return is_loopback4(ctx->local_ip4) || is_loopback4(ctx->remote_ip4) ||
		       (pod->pod_ip4 && ctx->remote_ip4 == pod->pod_ip4);
	/* Word by word in the condition: see IP6_GET. */
	if (ctx->local_ip6[0] == 0 && ctx->local_ip6[1] == 0 && ctx->local_ip6[2] == 0 &&
	    ctx->local_ip6[3] == LOOPBACK6_LAST)
		return true;
	if (ctx->remote_ip6[0] == 0 && ctx->remote_ip6[1] == 0 && ctx->remote_ip6[2] == 0 &&
	    (ctx->remote_ip6[3] == LOOPBACK6_LAST || ctx->remote_ip6[3] == PASSTHROUGH6_LAST))
		return true;
	return IP6_IS_SET(pod->pod_ip6) && ctx->remote_ip6[0] == pod->pod_ip6[0] &&
	       ctx->remote_ip6[1] == pod->pod_ip6[1] && ctx->remote_ip6[2] == pod->pod_ip6[2] &&
	       ctx->remote_ip6[3] == pod->pod_ip6[3];
}

/* A listener of the pod (a referenced socket: release it), or NULL. */
static __always_inline struct bpf_sock *find_listener(__u16 port, __u8 family, __u8 owner)
{
	struct listener_key key = {
		.netns_cookie = pod_cookie,
		.port = port,
		.family = family,
		.owner = owner,
	};

	return bpf_map_lookup_elem(&listeners, &key);
}

/* Hands the connection to `sk` and releases it; whether it took (an IPv4 connection is
 * refused by an IPv6-only socket). */
static __always_inline bool assign(struct bpf_sk_lookup *ctx, struct bpf_sock *sk)
{
	long err = bpf_sk_assign(ctx, sk, 0);

	bpf_sk_release(sk);
	return err == 0;
}

/* The connection's fate, for `meshbpf trace`: its destination, and the listener's port. */
static __always_inline void trace_inbound(struct bpf_sk_lookup *ctx, enum trace_reason reason,
					  __u16 port)
{
	struct orig_dst dst = { .port = bpf_htons((__u16)ctx->local_port), .family = ctx->family };
	struct orig_dst to = { .port = bpf_htons(port), .family = ctx->family };

	/*
	 * Every field read before the family is looked at (local_ip6 reads as zeros for
	 * IPv4): read in two branches, clang merges the reads through a computed ctx pointer,
	 * which the verifier refuses.
	 */
	__u32 ip4 = ctx->local_ip4, ip6_0 = ctx->local_ip6[0], ip6_1 = ctx->local_ip6[1],
	      ip6_2 = ctx->local_ip6[2], ip6_3 = ctx->local_ip6[3];

	barrier_var(ip4);
	barrier_var(ip6_0);
	barrier_var(ip6_1);
	barrier_var(ip6_2);
	barrier_var(ip6_3);
	if (dst.family == AF_INET) {
		dst.addr[0] = ip4;
	} else {
		dst.addr[0] = ip6_0;
		dst.addr[1] = ip6_1;
		dst.addr[2] = ip6_2;
		dst.addr[3] = ip6_3;
	}
	trace(TRACE_HOOK_SK_LOOKUP, reason, pod_cookie, IPPROTO_TCP, &dst,
	      reason == TRACE_INBOUND_TO_PROXY ? &to : NULL, false);
}

/* To the sidecar's listener on `port`: for IPv4, its IPv4 one, else a dual-stack one. */
static __always_inline int to_proxy(struct bpf_sk_lookup *ctx, __u16 port)
{
	struct bpf_sock *sk = find_listener(port, ctx->family, LISTENER_PROXY);

	if (sk && assign(ctx, sk))
		goto assigned;
	if (ctx->family == AF_INET) {
		sk = find_listener(port, AF_INET6, LISTENER_PROXY);
		if (sk && assign(ctx, sk))
			goto assigned;
	}
	count(CNT_INBOUND_REFUSED);
	trace_inbound(ctx, TRACE_INBOUND_REFUSED, port);
	return SK_DROP;
assigned:
	count(CNT_INBOUND_TO_PROXY);
	trace_inbound(ctx, TRACE_INBOUND_TO_PROXY, port);
	return SK_PASS;
}

/* Bind mode, IPv6 over lo to [::1]:PORT: an application's dual-stack listener, moved to
 * ::ffff:127.0.0.1:PORT (where IPv4 reaches it), takes it, as its [::]:PORT would have. */
static __always_inline int dual_stack_loopback(struct bpf_sk_lookup *ctx, __u16 port)
{
	struct bpf_sock *sk;

	/* Word by word in the condition: see IP6_GET. */
	if (ctx->family != AF_INET6 || ctx->local_ip6[0] || ctx->local_ip6[1] ||
	    ctx->local_ip6[2] || ctx->local_ip6[3] != LOOPBACK6_LAST)
		return SK_PASS;
	sk = find_listener(port, AF_INET6, LISTENER_APP);
	if (sk && assign(ctx, sk))
		count(CNT_INBOUND_DUAL_STACK);
	return SK_PASS;
}

SEC("sk_lookup")
int handle__sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct pod_settings *pod;
	__u16 port = (__u16)ctx->local_port;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	pod = lookup_pod(pod_cookie);
	if (!pod || !(pod->flags & POD_F_CAPTURE_INBOUND))
		return SK_PASS;
	if (from_the_pod(ctx, pod))
		return (pod->flags & POD_F_INBOUND_REDIRECT) ? SK_PASS : dual_stack_loopback(ctx, port);
	if (!inbound_port_captured(pod, pod_cookie, port))
		return SK_PASS;
	return to_proxy(ctx, (pod->flags & POD_F_INBOUND_REDIRECT) ? pod->inbound_port : port);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
