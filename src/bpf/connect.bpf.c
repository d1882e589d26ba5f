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

/*
 * Where the socket goes instead: a sidecar port on loopback, or 0 to leave it
 * alone. Decided once per connect (per sendto for unconnected UDP), in
 * istio-iptables' ISTIO_OUTPUT order:
 *   1. excluded outbound ports (-o)          never, TCP and UDP
 *   2. the proxy's uids / gids (-u, -g)      never
 *   3. loopback destinations                 never
 *   4. DNS, port 53, TCP and UDP             the DNS port (--redirect-dns)
 *   5. excluded outbound CIDRs (-x)          never
 *   6. included outbound ports (-q)          the outbound port
 *   7. included outbound CIDRs (-i, or *)    the outbound port
 *   8. anything else                         never
 */
static __always_inline __u16 redirect_port(struct bpf_sock_addr *ctx, bool v6, const __u32 addr[4],
					   bool loopback, __u16 dport)
{
	bool tcp = ctx->protocol == IPPROTO_TCP;
	bool dns = dport == DNS_PORT && (tcp || ctx->protocol == IPPROTO_UDP);
	struct pod_settings *pod;
	__u64 cookie;

	/* Most UDP sends are not DNS: decide them before any map lookup. */
	if (!tcp && !dns)
		return 0;
	cookie = bpf_get_netns_cookie(ctx);
	pod = lookup_pod(cookie);
	if (!pod)
		return 0;
	dns = dns && (pod->flags & POD_F_CAPTURE_DNS);
	if (!dns && !(tcp && (pod->flags & POD_F_CAPTURE_OUTBOUND)))
		return 0;
	if (pod_rule(pod, cookie, dport, RULE_OUTBOUND_EXCLUDE)) {
		count(CNT_SKIP_EXCLUDED_PORT);
		return 0;
	}
	if (is_proxy(pod, cookie)) {
		count(CNT_SKIP_PROXY_UID);
		return 0;
	}
	if (loopback) {
		count(CNT_SKIP_LOOPBACK);
		return 0;
	}
	if (dns) {
		count(CNT_DNS_REDIRECTED);
		return pod->dns_port;
	}
	if (dport == pod->outbound_port) {
		count(CNT_SKIP_PROXY_PORT);
		return 0;
	}
	if (in_cidrs(&cidr_exclude, pod, cookie, v6, addr)) {
		count(CNT_SKIP_EXCLUDED_CIDR);
		return 0;
	}
	if (!pod_rule(pod, cookie, dport, RULE_OUTBOUND_INCLUDE) &&
	    !(pod->flags & POD_F_OUTBOUND_ALL_CIDRS) && !in_cidrs(&cidr_include, pod, cookie, v6, addr)) {
		count(CNT_SKIP_NOT_INCLUDED);
		return 0;
	}
	count(CNT_CONNECT_REDIRECTED);
	return pod->outbound_port;
}

/*
 * Destinations that reach this host over loopback, never captured: 127.0.0.0/8 and ::1,
 * and the unspecified addresses, which connect(2) turns into loopback (the kernel routes
 * 0.0.0.0 to 127.0.0.1 and :: to ::1), so that istio-iptables' `-d 127.0.0.1/32 -j RETURN`
 * and `-o lo` rules leave them alone too.
 */
static __always_inline bool to_this_host4(__u32 ip)
{
	return ip == 0 || is_loopback4(ip);
}

static __always_inline bool to_this_host6(const __u32 addr[4])
{
	if (is_v4_mapped(addr))
		return to_this_host4(addr[3]);
	return (addr[0] | addr[1] | addr[2] | addr[3]) == 0 || is_loopback6(addr);
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
static __always_inline void mptcp_parent_keeps(struct bpf_sock_addr *ctx,
					       const struct orig_dst *dst)
{
	struct mptcp_sock *msk;
	struct sock_state *state;

	if (!mptcp_readable)
		return;
	msk = bpf_skc_to_mptcp_sock(ctx->sk);
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

static __always_inline bool remember(struct bpf_sock_addr *ctx, const struct orig_dst *dst)
{
	struct sock_state *state;

	state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		/* Without the original destination the proxy could not route: leave it alone. */
		count(CNT_STORAGE_FAILED);
		return false;
	}
	state->dst = *dst;
	if (ctx->protocol == IPPROTO_TCP)
		mptcp_parent_keeps(ctx, dst);
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
static __always_inline int leave_alone(struct bpf_sock_addr *ctx, bool connecting)
{
	struct sock_state *state;

	if (!connecting)
		return 1;
	state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);
	if (state) {
		state->dst.family = 0;
		if (ctx->protocol == IPPROTO_TCP)
			mptcp_parent_keeps(ctx, NULL);
	}
	return 1;
}

static __always_inline int redirect4(struct bpf_sock_addr *ctx, bool connecting)
{
	struct orig_dst dst = {};
	__u32 ip = ctx->user_ip4;
	__u16 port;

	dst.addr[0] = ip;
	port = redirect_port(ctx, false, dst.addr, to_this_host4(ip), bpf_ntohs(ctx->user_port));
	if (!port)
		return leave_alone(ctx, connecting);
	dst.port = ctx->user_port;
	dst.family = AF_INET;
	if (!remember(ctx, &dst))
		return 1;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(port);
	return 1;
}

static __always_inline int redirect6(struct bpf_sock_addr *ctx, bool connecting)
{
	struct orig_dst dst = {};
	__u32 to[4];
	__u16 port;

	dst.addr[0] = ctx->user_ip6[0];
	dst.addr[1] = ctx->user_ip6[1];
	dst.addr[2] = ctx->user_ip6[2];
	dst.addr[3] = ctx->user_ip6[3];
	/* An IPv4-mapped destination is matched against the IPv4 prefixes. */
	port = redirect_port(ctx, !is_v4_mapped(dst.addr),
			     is_v4_mapped(dst.addr) ? &dst.addr[3] : dst.addr, to_this_host6(dst.addr),
			     bpf_ntohs(ctx->user_port));
	if (!port)
		return leave_alone(ctx, connecting);
	dst.port = ctx->user_port;
	dst.family = AF_INET6;
	if (!remember(ctx, &dst))
		return 1;
	proxy_addr6(to, is_v4_mapped(dst.addr));
	ctx->user_ip6[0] = to[0];
	ctx->user_ip6[1] = to[1];
	ctx->user_ip6[2] = to[2];
	ctx->user_ip6[3] = to[3];
	ctx->user_port = bpf_htons(port);
	return 1;
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

SEC("cgroup/getpeername4")
int handle__getpeername4(struct bpf_sock_addr *ctx)
{
	if (peer_is_sidecar(ctx, is_loopback4(ctx->user_ip4)) && restore_orig_dst4(ctx))
		count(CNT_GETPEERNAME_RESTORED);
	return 1;
}

SEC("cgroup/getpeername6")
int handle__getpeername6(struct bpf_sock_addr *ctx)
{
	__u32 peer[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };

	if (peer_is_sidecar(ctx, is_loopback6(peer)) && restore_orig_dst6(ctx))
		count(CNT_GETPEERNAME_RESTORED);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
