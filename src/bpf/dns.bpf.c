// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * DNS replies and queries on their way in (cgroup/recvmsg4, recvmsg6):
 *
 * - The application's socket receives the sidecar's reply from
 *   127.0.0.1:DNS_PORT; the source is put back to the server it asked, so
 *   resolvers, dig and nslookup accept the answer unchanged.
 * - The sidecar's DNS socket receives a query from the application's socket;
 *   that socket is looked up (bpf_sk_lookup_udp) and its original server is
 *   kept on the sidecar's socket, where getsockopt(SO_ORIGINAL_DST) answers
 *   it: the unprivileged UDP counterpart of SO_ORIGINAL_DST, which the kernel
 *   has only for TCP. Read it right after recvfrom(), from the same thread.
 */
#include "common.bpf.h"

static __always_inline struct pod_settings *dns_pod(struct bpf_sock_addr *ctx, __u64 cookie)
{
	struct pod_settings *pod = lookup_pod(cookie);

	return pod && (pod->flags & POD_F_CAPTURE_DNS) ? pod : NULL;
}

/* Keeps the original server of the application socket `app` on the sidecar's socket. */
static __always_inline void keep_query_origin(struct bpf_sock_addr *ctx, struct bpf_sock *app)
{
	struct sock_state *theirs, *ours;

	ours = bpf_sk_storage_get(&sk_storage_map, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!ours)
		return;
	theirs = app ? bpf_sk_storage_get(&sk_storage_map, app, 0, 0) : NULL;
	if (theirs && theirs->dst.family) {
		ours->query_dst = theirs->dst;
		orig_dst_normalize(&ours->query_dst);
		count(CNT_DNS_QUERY_ORIGIN_FOUND);
	} else {
		/* Never leave the previous query's server to be mistaken for this one's. */
		ours->query_dst.family = 0;
		count(CNT_DNS_QUERY_ORIGIN_MISS);
	}
}

SEC("cgroup/recvmsg4")
int handle__recvmsg4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_settings *pod = dns_pod(ctx, cookie);
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *app;

	if (!pod)
		return SOCK_ALLOW;
	if (is_proxy(pod, cookie)) {
		if (ctx->sk->src_port != pod->dns_port)
			return SOCK_ALLOW;
		/* The application's socket is the one a datagram from here to its address reaches. */
		tuple.ipv4.saddr = ctx->sk->src_ip4 ? ctx->sk->src_ip4 : LOOPBACK4;
		tuple.ipv4.sport = bpf_htons(pod->dns_port);
		tuple.ipv4.daddr = ctx->user_ip4;
		tuple.ipv4.dport = ctx->user_port;
		app = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv4), LOOKUP_CURRENT_NETNS, 0);
		keep_query_origin(ctx, app);
		if (app)
			bpf_sk_release(app);
		return SOCK_ALLOW;
	}
	if (ctx->user_ip4 == LOOPBACK4 && ctx->user_port == bpf_htons(pod->dns_port) &&
	    restore_orig_dst4(ctx))
		count(CNT_DNS_REPLY_RESTORED);
	return SOCK_ALLOW;
}

/*
 * Not one body with recvmsg4: a shared body (the family a constant argument) reads
 * user_ip6 through a register holding ctx + 8, which the verifier refuses (measured with
 * clang 19 on 6.18: "dereference of modified ctx ptr").
 */
SEC("cgroup/recvmsg6")
int handle__recvmsg6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_settings *pod = dns_pod(ctx, cookie);
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *app;
	__u32 from[4], proxy[4];

	if (!pod)
		return SOCK_ALLOW;
	from[0] = ctx->user_ip6[0];
	from[1] = ctx->user_ip6[1];
	from[2] = ctx->user_ip6[2];
	from[3] = ctx->user_ip6[3];
	if (is_proxy(pod, cookie)) {
		if (ctx->sk->src_port != pod->dns_port)
			return SOCK_ALLOW;
		proxy_addr6(proxy, is_v4_mapped(from));
		__builtin_memcpy(tuple.ipv6.saddr, proxy, sizeof(proxy));
		__builtin_memcpy(tuple.ipv6.daddr, from, sizeof(from));
		tuple.ipv6.sport = bpf_htons(pod->dns_port);
		tuple.ipv6.dport = ctx->user_port;
		app = bpf_sk_lookup_udp(ctx, &tuple, sizeof(tuple.ipv6), LOOKUP_CURRENT_NETNS, 0);
		keep_query_origin(ctx, app);
		if (app)
			bpf_sk_release(app);
		return SOCK_ALLOW;
	}
	proxy_addr6(proxy, is_v4_mapped(from));
	if (from[0] == proxy[0] && from[1] == proxy[1] && from[2] == proxy[2] &&
	    from[3] == proxy[3] && ctx->user_port == bpf_htons(pod->dns_port) &&
	    restore_orig_dst6(ctx))
		count(CNT_DNS_REPLY_RESTORED);
	return SOCK_ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
