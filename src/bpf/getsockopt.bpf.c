// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Answers SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6):
 * - on the proxy's accepted TCP socket of a captured connection, so that a
 *   proxy written for iptables REDIRECT (Envoy's original_dst listener
 *   filter, HAProxy) works unmodified;
 * - on the sidecar's UDP DNS socket, with the original server of the query it
 *   received last (see dns.bpf.c).
 * Everything else keeps the kernel's own answer.
 *
 * This hook runs after the kernel's getsockopt. Setting optlen to 0 tells the
 * kernel to leave its result (value, length, error) exactly as it was; that
 * is also the way to let options larger than a page through, such as
 * iptables' 40 KB IPT_SO_GET_ENTRIES.
 */
#include "common.bpf.h"

/*
 * Set before load when this kernel lets cgroup/getsockopt programs read the calling task's
 * registers (bpf_task_pt_regs() there: Linux 6.x base helpers; absent on 6.1, where this
 * code is never verified, being unreachable).
 */
const volatile bool syscall_args_readable = false;

#define EFAULT 14
#define NR_GETSOCKOPT_X86_64 55
#define NR_GETSOCKOPT_ARM64 209

/*
 * Whether the caller of getsockopt(2) passed optval == NULL. The kernel hands this hook a
 * buffer of its own and, when the caller's pointer is NULL, skips copying the answer out, so
 * an answer would "succeed" where iptables' SO_ORIGINAL_DST fails with EFAULT. Read from the
 * system call's own arguments; any other way in (io_uring, 32-bit compat) counts as non-NULL.
 */
static __always_inline bool optval_is_null(void)
{
	struct pt_regs *regs;

	if (!syscall_args_readable)
		return false;
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	if (!regs)
		return false;
#if defined(__TARGET_ARCH_x86)
	return regs->orig_ax == NR_GETSOCKOPT_X86_64 && regs->r10 == 0;
#elif defined(__TARGET_ARCH_arm64)
	return regs->syscallno == NR_GETSOCKOPT_ARM64 && regs->regs[3] == 0;
#else
	return false;
#endif
}

/* The longest answer buffer zeroed past the address: a sockaddr_storage. */
#define ANSWER_MAX 128
#define ANSWER_ALIGNED(n) (((n) + 7) & ~7)

/*
 * Netfilter's getorigdst() writes the address and leaves the caller's length as it was
 * (Envoy passes a sockaddr_storage): so does this, the bytes after the address zeroed, for
 * this buffer is the kernel's and not the caller's when the kernel's own answer failed.
 * Returns the length to report.
 */
static __always_inline int answer_len(struct bpf_sockopt *ctx, int addr_len)
{
	__u8 *buf = ctx->optval;
	int len = ctx->optlen < ANSWER_MAX ? ctx->optlen : ANSWER_MAX;

	/* What proxies pass (a sockaddr_storage): one block of 8-byte stores, not the loop's
	 * byte at a time with two bounds checks each. */
	if (len == ANSWER_MAX && (void *)(buf + ANSWER_MAX) <= ctx->optval_end) {
		__u64 *words = (__u64 *)(buf + ANSWER_ALIGNED(addr_len));

		for (int i = addr_len; i < ANSWER_ALIGNED(addr_len); i++)
			buf[i] = 0;
		for (int i = 0; i < (ANSWER_MAX - ANSWER_ALIGNED(addr_len)) / 8; i++)
			words[i] = 0;
		return len;
	}
	for (int i = 0; i < ANSWER_MAX; i++) {
		if (i < addr_len)
			continue;
		if (i >= len || (void *)(buf + i + 1) > ctx->optval_end)
			return i;
		buf[i] = 0;
	}
	return len;
}

static __always_inline int pass(struct bpf_sockopt *ctx)
{
	ctx->optlen = 0;
	return SOCK_ALLOW;
}

/*
 * Redirect mode: a connection the pod's sk_lookup program handed to the sidecar's inbound
 * listener keeps its original destination as its local address (pod_ip:PORT), which is
 * what SO_ORIGINAL_DST answers behind iptables' ISTIO_IN_REDIRECT too. Any accepted socket
 * of such a pod on a captured port, not on loopback, came that way.
 */
static __always_inline bool redirected_inbound(struct bpf_sockopt *ctx, struct bpf_sock *sk,
					       struct orig_dst *out)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct pod_settings *pod = lookup_pod(cookie);
	__u16 port = (__u16)sk->src_port;

	if (!pod || (pod->flags & (POD_F_CAPTURE_INBOUND | POD_F_INBOUND_REDIRECT)) !=
			    (POD_F_CAPTURE_INBOUND | POD_F_INBOUND_REDIRECT) ||
	    !inbound_port_captured(pod, cookie, port))
		return false;
	__builtin_memset(out, 0, sizeof(*out));
	out->port = bpf_htons(port);
	if (sk->family == AF_INET) {
		out->family = AF_INET;
		out->addr[0] = sk->src_ip4;
	} else {
		out->family = AF_INET6;
		out->addr[0] = sk->src_ip6[0];
		out->addr[1] = sk->src_ip6[1];
		out->addr[2] = sk->src_ip6[2];
		out->addr[3] = sk->src_ip6[3];
		orig_dst_normalize(out);
	}
	return out->family == AF_INET ? !is_loopback4(out->addr[0]) : !is_loopback6(out->addr);
}

static __always_inline struct orig_dst *udp_origin(struct bpf_sock *sk)
{
	struct sock_state *state = bpf_sk_storage_get(&sk_storage_map, sk, 0, 0);

	return state && state->query_dst.family ? &state->query_dst : NULL;
}

/*
 * Which answers there are, as behind iptables: SOL_IP answers a connection that is IPv4,
 * also on a dual-stack IPv6 socket (netfilter's IPv4 getorigdst() reads such a socket's
 * IPv4 addresses); SOL_IPV6 answers a connection that is IPv6. Every other combination
 * keeps the kernel's answer (EOPNOTSUPP for SOL_IPV6 on IPv4, ENOENT for a v4-mapped
 * connection asked at SOL_IPV6); proxies probe v6 first, then v4.
 */
SEC("cgroup/getsockopt")
int handle__getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct orig_dst *dst, inbound;
	int want, answer;

	if (ctx->optname != SO_ORIGINAL_DST || !sk)
		return pass(ctx);
	if (ctx->level == SOL_IP)
		want = AF_INET;
	else if (ctx->level == SOL_IPV6 && sk->family == AF_INET6)
		want = AF_INET6;
	else
		return pass(ctx);

	if (sk->protocol == IPPROTO_TCP) {
		dst = accepted_origin(sk, bpf_get_netns_cookie(ctx));
		if (!dst && redirected_inbound(ctx, sk, &inbound))
			dst = &inbound;
	} else if (sk->protocol == IPPROTO_UDP)
		dst = udp_origin(sk);
	else
		return pass(ctx);
	if (!dst) {
		count(CNT_GETSOCKOPT_MISS);
		trace(TRACE_HOOK_GETSOCKOPT, TRACE_ORIGIN_MISSED, bpf_get_netns_cookie(ctx),
		      sk->protocol, NULL, NULL, true);
		return pass(ctx);
	}
	if (dst->family != want)
		return pass(ctx);

	/* In iptables' order: a short buffer is EINVAL, then a NULL one EFAULT. */
	if (want == AF_INET) {
		struct sockaddr_in *sin = ctx->optval;

		if (ctx->optlen < (int)sizeof(*sin) || (void *)(sin + 1) > ctx->optval_end)
			return pass(ctx);
		if (optval_is_null())
			goto efault;
		__builtin_memset(sin, 0, sizeof(*sin));
		sin->sin_family = AF_INET;
		sin->sin_port = dst->port;
		sin->sin_addr.s_addr = dst->addr[0];
		answer = answer_len(ctx, sizeof(*sin));
	} else {
		struct sockaddr_in6 *sin6 = ctx->optval;

		if (ctx->optlen < (int)sizeof(*sin6) || (void *)(sin6 + 1) > ctx->optval_end)
			return pass(ctx);
		if (optval_is_null())
			goto efault;
		__builtin_memset(sin6, 0, sizeof(*sin6));
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = dst->port;
		sin6->sin6_addr.in6_u.u6_addr32[0] = dst->addr[0];
		sin6->sin6_addr.in6_u.u6_addr32[1] = dst->addr[1];
		sin6->sin6_addr.in6_u.u6_addr32[2] = dst->addr[2];
		sin6->sin6_addr.in6_u.u6_addr32[3] = dst->addr[3];
		answer = answer_len(ctx, sizeof(*sin6));
	}
	/* One store for both families: two, clang merges through a computed ctx pointer,
	 * which the verifier refuses. */
	ctx->optlen = answer;
	ctx->retval = 0;
	count(CNT_GETSOCKOPT_ANSWERED);
	trace(TRACE_HOOK_GETSOCKOPT, TRACE_ORIGIN_ANSWERED, bpf_get_netns_cookie(ctx), sk->protocol,
	      dst, NULL, true);
	return SOCK_ALLOW;
efault:
	ctx->retval = -EFAULT;
	return SOCK_ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
