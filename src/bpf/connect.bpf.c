// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Outbound TCP capture: connect() of a registered pod's application is sent to
 * the sidecar's outbound listener, the address it asked for is kept in the
 * socket's storage, and getpeername() keeps reporting that address, as it does
 * behind iptables REDIRECT (where NAT is undone on the way back).
 */
#include "common.bpf.h"

/*
 * Decide once per connect(); returns the pod when the socket must be captured.
 * Order mirrors istio-iptables' ISTIO_OUTPUT: proxy uid/gid first, then
 * loopback destinations, then the proxy's own listener.
 */
static __always_inline struct pod_settings *
capture_tcp(struct bpf_sock_addr *ctx, bool loopback, __u16 dport)
{
	struct pod_settings *pod;

	if (ctx->protocol != IPPROTO_TCP)
		return NULL;
	pod = lookup_pod(bpf_get_netns_cookie(ctx));
	if (!pod || !(pod->flags & POD_F_CAPTURE_OUTBOUND))
		return NULL;
	if (is_proxy(pod)) {
		count(CNT_SKIP_PROXY_UID);
		return NULL;
	}
	if (loopback) {
		count(CNT_SKIP_LOOPBACK);
		return NULL;
	}
	if (dport == pod->outbound_port) {
		count(CNT_SKIP_PROXY_PORT);
		return NULL;
	}
	return pod;
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
	return true;
}

SEC("cgroup/connect4")
int handle__connect4(struct bpf_sock_addr *ctx)
{
	struct orig_dst dst = {};
	struct pod_settings *pod;
	__u32 ip = ctx->user_ip4;

	pod = capture_tcp(ctx, is_loopback4(ip), bpf_ntohs(ctx->user_port));
	if (!pod)
		return 1;

	dst.addr[0] = ip;
	dst.port = ctx->user_port;
	dst.family = AF_INET;
	if (!remember(ctx, &dst))
		return 1;

	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(pod->outbound_port);
	count(CNT_CONNECT_REDIRECTED);
	return 1;
}

SEC("cgroup/connect6")
int handle__connect6(struct bpf_sock_addr *ctx)
{
	struct orig_dst dst = {};
	struct pod_settings *pod;
	bool mapped;

	dst.addr[0] = ctx->user_ip6[0];
	dst.addr[1] = ctx->user_ip6[1];
	dst.addr[2] = ctx->user_ip6[2];
	dst.addr[3] = ctx->user_ip6[3];
	pod = capture_tcp(ctx, is_loopback6(dst.addr), bpf_ntohs(ctx->user_port));
	if (!pod)
		return 1;

	dst.port = ctx->user_port;
	dst.family = AF_INET6;
	if (!remember(ctx, &dst))
		return 1;

	/* An IPv4-mapped destination goes to the IPv4 listener, through ::ffff:127.0.0.1. */
	mapped = is_v4_mapped(dst.addr);
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = mapped ? bpf_htonl(0x0000ffff) : 0;
	ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	ctx->user_port = bpf_htons(pod->outbound_port);
	count(CNT_CONNECT_REDIRECTED);
	return 1;
}

SEC("cgroup/getpeername4")
int handle__getpeername4(struct bpf_sock_addr *ctx)
{
	struct sock_state *state;
	struct orig_dst *dst;

	state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);
	if (!state || state->dst.family != AF_INET)
		return 1;
	dst = &state->dst;
	ctx->user_ip4 = dst->addr[0];
	ctx->user_port = dst->port;
	count(CNT_GETPEERNAME_RESTORED);
	return 1;
}

SEC("cgroup/getpeername6")
int handle__getpeername6(struct bpf_sock_addr *ctx)
{
	struct sock_state *state;
	struct orig_dst *dst;

	state = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, 0);
	if (!state || state->dst.family != AF_INET6)
		return 1;
	dst = &state->dst;
	ctx->user_ip6[0] = dst->addr[0];
	ctx->user_ip6[1] = dst->addr[1];
	ctx->user_ip6[2] = dst->addr[2];
	ctx->user_ip6[3] = dst->addr[3];
	ctx->user_port = dst->port;
	count(CNT_GETPEERNAME_RESTORED);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
