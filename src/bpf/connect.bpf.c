// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Outbound capture: connect() of a registered pod's application is sent to the
 * sidecar on loopback (TCP to the outbound listener; TCP and UDP to port 53 to
 * the DNS listener), as is sendto()/sendmsg() of DNS on an unconnected UDP
 * socket. The address the application asked for is kept in the socket's
 * storage, and getpeername() keeps reporting it, as it does behind iptables
 * REDIRECT (where NAT is undone on the way back).
 */
#include "common.bpf.h"

/* A destination as connect4/6 and sendmsg4/6 see it. */
struct dest {
	__u32 addr[4];	/* IPv4 (also IPv4-mapped) in addr[0], or IPv6; network order */
	bool v6;	/* addr is IPv6, not IPv4-mapped */
	__u16 port;	/* host order */
};

/* The port istio-iptables never sends to the inbound listener (its `-e`, HBONE). */
#define INBOUND_TUNNEL_PORT 15008

static __always_inline bool dest_is(const struct dest *d, __u32 ip4, __u32 ip6_last)
{
	if (!d->v6)
		return d->addr[0] == ip4;
	return d->addr[0] == 0 && d->addr[1] == 0 && d->addr[2] == 0 && d->addr[3] == ip6_last;
}

/*
 * Destinations that reach this host over loopback, as istio-iptables' `-o lo` rules see
 * them: 127.0.0.0/8, ::1 (and ::6 in redirect mode), the unspecified addresses (connect(2)
 * turns 0.0.0.0 into 127.0.0.1 and :: into ::1), and the pod's own addresses.
 */
static __always_inline bool over_lo(const struct dest *d, const struct pod_settings *pod)
{
	if (!d->v6)
		return d->addr[0] == 0 || is_loopback4(d->addr[0]) ||
		       (pod->pod_ip4 && d->addr[0] == pod->pod_ip4);
	if (dest_is(d, 0, 0) || dest_is(d, 0, LOOPBACK6_LAST))
		return true;
	/* ::6, Envoy's IPv6 passthrough source, is on lo in redirect mode (`register` adds it) */
	if ((pod->flags & POD_F_INBOUND_REDIRECT) && dest_is(d, 0, PASSTHROUGH6_LAST))
		return true;
	return IP6_IS_SET(pod->pod_ip6) && IP6_EQ(d->addr, pod->pod_ip6);
}

/* `-d 127.0.0.1/32` (`::1/128`): the loopback address itself (what 0.0.0.0 and :: become). */
static __always_inline bool to_the_loopback(const struct dest *d)
{
	return dest_is(d, 0, 0) || dest_is(d, LOOPBACK4, LOOPBACK6_LAST);
}

/* Bound to 127.0.0.6 (::6): Envoy's inbound passthrough upstream and pilot-agent's probes. */
static __always_inline bool from_inbound_passthrough(struct bpf_sock_addr *ctx, bool v6)
{
	struct bpf_sock *sk = ctx->sk;

	if (!v6)
		return sk->src_ip4 == PASSTHROUGH4;
	return sk->src_ip6[0] == 0 && sk->src_ip6[1] == 0 && sk->src_ip6[2] == 0 &&
	       sk->src_ip6[3] == PASSTHROUGH6_LAST;
}

/*
 * Where the socket goes instead: a sidecar port on loopback, or 0 to leave it alone.
 * Decided once per connect (per sendto for unconnected UDP), in istio-iptables'
 * ISTIO_OUTPUT order:
 *   1. excluded outbound ports (-o)                         never, TCP and UDP
 *   2. from 127.0.0.6 / ::6 over lo                          never
 *   3. the proxy's uids / gids (-u, -g): in redirect mode,   the inbound port
 *      by uid, TCP over lo not to 127.0.0.1, port not 15008 (nor 53
 *      with DNS capture): its calls to its own pod
 *      (and istio-validation's to 127.0.0.6:15002);
 *      anything else                                         never
 *   4. DNS, port 53, TCP and UDP (also over lo)              the DNS port (--redirect-dns)
 *   5. over lo (loopback, the pod's own addresses)           never
 *   6. excluded outbound CIDRs (-x)                          never
 *   7. included outbound ports (-q)                          the outbound port
 *   8. included outbound CIDRs (-i, or *)                    the outbound port
 *   9. anything else                                         never
 */
/* What redirect_port decided and why: for the counters and `meshbpf trace`. */
struct decision {
	__u64 netns_cookie;
	__u16 reason;		/* enum trace_reason; 0: not a registered pod's decision */
};

static __always_inline __u16 decided(struct decision *out, __u16 port, enum trace_reason reason,
				     enum counter counter)
{
	out->reason = reason;
	count(counter);
	return port;
}

static __always_inline __u16 redirect_port(struct bpf_sock_addr *ctx, const struct dest *d,
					   struct decision *out)
{
	bool tcp = ctx->protocol == IPPROTO_TCP;
	bool dns = d->port == DNS_PORT && (tcp || ctx->protocol == IPPROTO_UDP);
	struct pod_settings *pod;
	bool lo, ipv6_socket = ctx->family == AF_INET6;
	__u64 cookie;

	/* Most UDP sends are not DNS: decide them before any map lookup. */
	if (!tcp && !dns)
		return 0;
	cookie = bpf_get_netns_cookie(ctx);
	pod = lookup_pod(cookie);
	if (!pod)
		return 0;
	out->netns_cookie = cookie;
	lo = over_lo(d, pod);
	if (!(pod->flags & POD_F_NO_OUTBOUND_EXCLUDED_PORTS) &&
	    pod_rule(pod, cookie, d->port, RULE_OUTBOUND_EXCLUDE))
		return decided(out, 0, TRACE_SKIP_EXCLUDED_PORT, CNT_SKIP_EXCLUDED_PORT);
	if (lo && from_inbound_passthrough(ctx, ipv6_socket))
		return decided(out, 0, TRACE_SKIP_PASSTHROUGH, CNT_SKIP_LOOPBACK);
	if (dns && !(pod->flags & POD_F_CAPTURE_DNS)) {
		dns = false;
		if (!tcp) /* TCP to port 53 without DNS capture is outbound like any other */
			return decided(out, 0, TRACE_SKIP_DNS_OFF, CNT_SKIP_NOT_INCLUDED);
	}
	if (is_proxy(pod, cookie)) {
		if (tcp && lo && !to_the_loopback(d) && d->port != INBOUND_TUNNEL_PORT && !dns &&
		    (pod->flags & (POD_F_CAPTURE_INBOUND | POD_F_INBOUND_REDIRECT)) ==
			    (POD_F_CAPTURE_INBOUND | POD_F_INBOUND_REDIRECT) &&
		    is_proxy_uid(pod, cookie))
			return decided(out, pod->inbound_port, TRACE_TO_INBOUND,
				       CNT_PROXY_TO_INBOUND);
		return decided(out, 0, TRACE_SKIP_PROXY, CNT_SKIP_PROXY_UID);
	}
	if (dns)
		return decided(out, pod->dns_port, TRACE_CAPTURED_DNS, CNT_DNS_REDIRECTED);
	if (!(pod->flags & POD_F_CAPTURE_OUTBOUND))
		return decided(out, 0, TRACE_SKIP_OUTBOUND_OFF, CNT_SKIP_NOT_INCLUDED);
	if (lo)
		return decided(out, 0, TRACE_SKIP_LOOPBACK, CNT_SKIP_LOOPBACK);
	if (d->port == pod->outbound_port)
		return decided(out, 0, TRACE_SKIP_PROXY_PORT, CNT_SKIP_PROXY_PORT);
	if (!(pod->flags & POD_F_NO_OUTBOUND_EXCLUDED_CIDRS) &&
	    in_cidrs(&cidr_exclude, pod, cookie, d->v6, d->addr))
		return decided(out, 0, TRACE_SKIP_EXCLUDED_CIDR, CNT_SKIP_EXCLUDED_CIDR);
	if (!(pod->flags & POD_F_OUTBOUND_ALL_CIDRS) &&
	    ((pod->flags & POD_F_NO_OUTBOUND_INCLUDED_PORTS) ||
	     !pod_rule(pod, cookie, d->port, RULE_OUTBOUND_INCLUDE)) &&
	    !in_cidrs(&cidr_include, pod, cookie, d->v6, d->addr))
		return decided(out, 0, TRACE_SKIP_NOT_INCLUDED, CNT_SKIP_NOT_INCLUDED);
	return decided(out, pod->outbound_port, TRACE_CAPTURED, CNT_CONNECT_REDIRECTED);
}

/*
 * Set before load when bpf_skc_to_mptcp_sock() is there (Linux 5.19); older kernels never
 * verify the code it guards.
 */
const volatile bool mptcp_readable = false;

/*
 * An MPTCP connection is made by its first subflow, a TCP socket: that is what connect4/6
 * and sockops see. The application holds the MPTCP socket, whose getpeername() must name
 * the original destination too, so it keeps its own copy (`dst` NULL: forgets it).
 */
static __always_inline void mptcp_parent_keeps(struct bpf_sock *sk, const struct orig_dst *dst)
{
	struct mptcp_sock *msk;
	struct sock_state *state;

	if (!mptcp_readable)
		return;
	msk = bpf_skc_to_mptcp_sock(sk);
	if (!msk)
		return;
	state = bpf_sk_storage_get(&sk_storage_map, msk, 0, dst ? BPF_SK_STORAGE_GET_F_CREATE : 0);
	if (!state)
		return;
	if (dst)
		state->dst = *dst;
	else
		state->dst.family = 0;
}

static __always_inline bool remember(struct bpf_sock_addr *ctx, struct bpf_sock *sk,
				      const struct orig_dst *dst)
{
	struct sock_state *state;

	state = bpf_sk_storage_get(&sk_storage_map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		/* Without the original destination the proxy could not route: leave it alone. */
		count(CNT_STORAGE_FAILED);
		return false;
	}
	state->dst = *dst;
	if (ctx->protocol == IPPROTO_TCP)
		mptcp_parent_keeps(sk, dst);
	return true;
}

/*
 * A socket that connects again (after a failed connect, connect(AF_UNSPEC), or an
 * unconnected DNS sendto) and is not captured this time must not keep an original
 * destination from before: getpeername() would lie, sockops would publish it for this
 * connection (a loopback server of the pod would be told a forged SO_ORIGINAL_DST), and the
 * socket would enter sock_hash. A datagram sent with sendto() keeps it: a reply to an
 * earlier DNS query may still be on its way.
 */
static __always_inline int leave_alone(struct bpf_sock_addr *ctx, struct bpf_sock *sk,
				       bool connecting)
{
	struct sock_state *state;

	if (!connecting)
		return SOCK_ALLOW;
	state = bpf_sk_storage_get(&sk_storage_map, sk, 0, 0);
	if (state) {
		state->dst.family = 0;
		if (ctx->protocol == IPPROTO_TCP)
			mptcp_parent_keeps(sk, NULL);
	}
	return SOCK_ALLOW;
}

/* The decision, for `meshbpf trace`: what was asked, what it became. */
static __always_inline void trace_decision(struct bpf_sock_addr *ctx, bool connecting,
					   const struct decision *how, const struct orig_dst *dst,
					   __u16 port)
{
	struct orig_dst to = {};

	if (!how->reason)
		return;
	if (port) {
		to.family = dst->family;
		to.port = bpf_htons(port);
		if (dst->family == AF_INET)
			to.addr[0] = LOOPBACK4;
		else
			proxy_addr6(to.addr, is_v4_mapped(dst->addr));
	}
	trace(connecting ? TRACE_HOOK_CONNECT : TRACE_HOOK_SENDMSG, how->reason, how->netns_cookie,
	      ctx->protocol, dst, port ? &to : NULL, true);
}

/*
 * ctx->sk is read once, before any branch: read in several branches, clang may merge the
 * reads into one through a computed ctx pointer, which the verifier refuses.
 */
static __always_inline int redirect4(struct bpf_sock_addr *ctx, bool connecting)
{
	struct bpf_sock *sk = ctx->sk;
	struct dest d = { .addr = { ctx->user_ip4 }, .port = bpf_ntohs(ctx->user_port) };
	struct decision how = {};
	struct orig_dst dst = {};
	__u16 port;

	port = redirect_port(ctx, &d, &how);
	dst.addr[0] = d.addr[0];
	dst.port = ctx->user_port;
	dst.family = AF_INET;
	trace_decision(ctx, connecting, &how, &dst, port);
	if (!port)
		return leave_alone(ctx, sk, connecting);
	if (!remember(ctx, sk, &dst))
		return SOCK_ALLOW;
	ctx->user_ip4 = LOOPBACK4;
	ctx->user_port = bpf_htons(port);
	return SOCK_ALLOW;
}

static __always_inline int redirect6(struct bpf_sock_addr *ctx, bool connecting)
{
	struct bpf_sock *sk = ctx->sk;
	struct decision how = {};
	struct orig_dst dst = {};
	struct dest d = { .port = bpf_ntohs(ctx->user_port) };
	bool mapped;
	__u32 to[4];
	__u16 port;

	dst.addr[0] = ctx->user_ip6[0];
	dst.addr[1] = ctx->user_ip6[1];
	dst.addr[2] = ctx->user_ip6[2];
	dst.addr[3] = ctx->user_ip6[3];
	/* An IPv4-mapped destination is decided as the IPv4 address it is. */
	mapped = is_v4_mapped(dst.addr);
	if (mapped) {
		d.addr[0] = dst.addr[3];
	} else {
		d.v6 = true;
		d.addr[0] = dst.addr[0];
		d.addr[1] = dst.addr[1];
		d.addr[2] = dst.addr[2];
		d.addr[3] = dst.addr[3];
	}
	port = redirect_port(ctx, &d, &how);
	dst.port = ctx->user_port;
	dst.family = AF_INET6;
	trace_decision(ctx, connecting, &how, &dst, port);
	if (!port)
		return leave_alone(ctx, sk, connecting);
	if (!remember(ctx, sk, &dst))
		return SOCK_ALLOW;
	proxy_addr6(to, mapped);
	ctx->user_ip6[0] = to[0];
	ctx->user_ip6[1] = to[1];
	ctx->user_ip6[2] = to[2];
	ctx->user_ip6[3] = to[3];
	ctx->user_port = bpf_htons(port);
	return SOCK_ALLOW;
}

SEC("cgroup/connect4")
int handle__connect4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx, true);
}

SEC("cgroup/connect6")
int handle__connect6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx, true);
}

/* Unconnected UDP: every sendto() with an address passes here (connected sends do not). */
SEC("cgroup/sendmsg4")
int handle__sendmsg4(struct bpf_sock_addr *ctx)
{
	return redirect4(ctx, false);
}

SEC("cgroup/sendmsg6")
int handle__sendmsg6(struct bpf_sock_addr *ctx)
{
	return redirect6(ctx, false);
}

/* getpeername() of a socket talking to its pod's sidecar: ctx holds that peer. */
static __always_inline bool peer_is_sidecar(struct bpf_sock_addr *ctx, bool loopback)
{
	struct pod_settings *pod;

	if (!loopback)
		return false;
	pod = lookup_pod(bpf_get_netns_cookie(ctx));
	return pod && is_sidecar_port(pod, bpf_ntohs(ctx->user_port));
}

/*
 * Names the pod's own address in ctx's IPv6 address, IPv4-mapped when `mapped` (a dual-stack
 * socket's IPv4 connection); false, leaving it, when the pod has no address of that family.
 */
static __always_inline bool name_pod_addr6(struct bpf_sock_addr *ctx, const struct pod_settings *pod,
					   bool mapped)
{
	if (mapped) {
		if (!pod->pod_ip4)
			return false;
		ctx->user_ip6[3] = pod->pod_ip4;
		return true;
	}
	if (!IP6_IS_SET(pod->pod_ip6))
		return false;
	ctx->user_ip6[0] = pod->pod_ip6[0];
	ctx->user_ip6[1] = pod->pod_ip6[1];
	ctx->user_ip6[2] = pod->pod_ip6[2];
	ctx->user_ip6[3] = pod->pod_ip6[3];
	return true;
}

/*
 * The sidecar's end of a captured connection (accepted on its outbound or DNS port from an
 * application's socket on loopback): its peer is named as that socket names itself, the
 * pod's address with the application's port. Behind iptables REDIRECT the connection
 * really comes from the pod's address, and Envoy takes accept()'s peer (accept runs this
 * hook) as the downstream remote address: access logs, source-address RBAC, the
 * x-forwarded-for it adds. An application bound to a pod address needs nothing: its peer
 * is that address already. Returns the pod, or NULL to leave the peer alone.
 */
static __always_inline struct pod_settings *proxy_end_of_capture(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_settings *pod = lookup_pod(cookie);
	__u16 port = (__u16)sk->src_port;

	if (!pod || sk->protocol != IPPROTO_TCP ||
	    (port != pod->outbound_port && port != pod->dns_port))
		return NULL;
	return accepted_origin(sk, cookie) ? pod : NULL;
}

SEC("cgroup/getpeername4")
int handle__getpeername4(struct bpf_sock_addr *ctx)
{
	bool loopback = is_loopback4(ctx->user_ip4);
	struct pod_settings *pod;

	if (peer_is_sidecar(ctx, loopback) && restore_orig_dst4(ctx)) {
		count(CNT_GETPEERNAME_RESTORED);
	} else if (loopback && (pod = proxy_end_of_capture(ctx)) && pod->pod_ip4) {
		ctx->user_ip4 = pod->pod_ip4;
		count(CNT_PROXY_PEER_RESTORED);
	}
	return SOCK_ALLOW;
}

SEC("cgroup/getpeername6")
int handle__getpeername6(struct bpf_sock_addr *ctx)
{
	__u32 peer[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	bool loopback = is_loopback6(peer);
	struct pod_settings *pod;

	if (peer_is_sidecar(ctx, loopback) && restore_orig_dst6(ctx)) {
		count(CNT_GETPEERNAME_RESTORED);
		return SOCK_ALLOW;
	}
	if (loopback && (pod = proxy_end_of_capture(ctx)) &&
	    name_pod_addr6(ctx, pod, is_v4_mapped(peer)))
		count(CNT_PROXY_PEER_RESTORED);
	return SOCK_ALLOW;
}

/*
 * getsockname() of a captured socket names the pod's own address, as behind iptables
 * REDIRECT, where the connection really leaves from it: here it goes to the sidecar on
 * loopback, from 127.0.0.1 (ctx holds that local address). The port stays the socket's.
 */
static __always_inline struct pod_settings *captured_pod(struct bpf_sock_addr *ctx)
{
	struct sock_state *state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);
	struct bpf_sock *sk = ctx->sk;
	struct pod_settings *pod;

	/*
	 * The application's socket: TCP, or MPTCP, whose getsockname() is this hook's on the
	 * MPTCP socket itself (inet_getname() / inet6_getname() on the msk), which holds its own
	 * copy of the original destination (mptcp_parent_keeps) and the first subflow's
	 * addresses (mptcp_copy_inaddrs() at connect): the sidecar's port, a loopback source.
	 */
	if (!state || !state->dst.family ||
	    (sk->protocol != IPPROTO_TCP && sk->protocol != IPPROTO_MPTCP))
		return NULL;
	/* To a loopback address (the sidecar's own calls sent to its inbound listener), the
	 * connection leaves from loopback behind iptables too. */
	if (state->dst.family == AF_INET ? is_loopback4(state->dst.addr[0])
					 : is_loopback6(state->dst.addr))
		return NULL;
	pod = lookup_pod(bpf_get_netns_cookie(ctx));
	return pod && is_sidecar_port(pod, bpf_ntohs(sk->dst_port)) ? pod : NULL;
}

SEC("cgroup/getsockname4")
int handle__getsockname4(struct bpf_sock_addr *ctx)
{
	struct pod_settings *pod;

	if (!is_loopback4(ctx->user_ip4))
		return SOCK_ALLOW;
	pod = captured_pod(ctx);
	if (pod && pod->pod_ip4) {
		ctx->user_ip4 = pod->pod_ip4;
		count(CNT_GETSOCKNAME_RESTORED);
	}
	return SOCK_ALLOW;
}

SEC("cgroup/getsockname6")
int handle__getsockname6(struct bpf_sock_addr *ctx)
{
	__u32 local[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	struct pod_settings *pod;

	if (!is_loopback6(local))
		return SOCK_ALLOW;
	pod = captured_pod(ctx);
	if (pod && name_pod_addr6(ctx, pod, is_v4_mapped(local)))
		count(CNT_GETSOCKNAME_RESTORED);
	return SOCK_ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
