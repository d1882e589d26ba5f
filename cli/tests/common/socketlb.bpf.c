// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* A socket load balancer in the style of a CNI's kube-proxy replacement (Cilium's
 * socket-LB, Calico eBPF's connect-time load balancing), written for meshbpf's tests; no
 * line of either. A Service VIP:port is translated to one backend at connect4/6 and
 * sendmsg4/6, and the backend back to the VIP at getpeername4/6 and recvmsg4/6, keyed by
 * the socket's cookie and the backend (as a CNI does, so that only the sockets it
 * translated are reversed). Self-contained: compiled by the tests with clang and the
 * repository's vmlinux.h, without libbpf's headers.
 */
#include "vmlinux.h"

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define __always_inline inline __attribute__((always_inline))

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
				   __u64 flags) = (void *)2;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)46;

/* One address of either family: IPv4 in addr[0], the port in network order as the
 * context's user_port holds it. */
struct lb_addr {
	__u32 addr[4];
	__u32 port;
	__u32 family;
};

struct rev_key {
	__u64 cookie;
	struct lb_addr backend;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct lb_addr);
	__type(value, struct lb_addr);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct rev_key);
	__type(value, struct lb_addr);
} reverse SEC(".maps");

/* What it did, by hook: connect4, connect6, sendmsg4, sendmsg6 (translations), then
 * getpeername4, getpeername6, recvmsg4, recvmsg6 (reversals). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &slot);

	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void read_addr(struct bpf_sock_addr *ctx, struct lb_addr *a, int v6)
{
	__builtin_memset(a, 0, sizeof(*a));
	if (v6) {
		a->addr[0] = ctx->user_ip6[0];
		a->addr[1] = ctx->user_ip6[1];
		a->addr[2] = ctx->user_ip6[2];
		a->addr[3] = ctx->user_ip6[3];
	} else {
		a->addr[0] = ctx->user_ip4;
	}
	a->port = ctx->user_port;
	a->family = v6 ? 10 : 2;
}

static __always_inline void write_addr(struct bpf_sock_addr *ctx, const struct lb_addr *a, int v6)
{
	if (v6) {
		ctx->user_ip6[0] = a->addr[0];
		ctx->user_ip6[1] = a->addr[1];
		ctx->user_ip6[2] = a->addr[2];
		ctx->user_ip6[3] = a->addr[3];
	} else {
		ctx->user_ip4 = a->addr[0];
	}
	ctx->user_port = a->port;
}

/* VIP -> backend, remembered for this socket. */
static __always_inline int translate(struct bpf_sock_addr *ctx, int v6, __u32 slot)
{
	struct lb_addr vip;
	struct rev_key rev = {};
	struct lb_addr *backend;

	read_addr(ctx, &vip, v6);
	backend = bpf_map_lookup_elem(&services, &vip);
	if (!backend)
		return 1;
	rev.cookie = bpf_get_socket_cookie(ctx);
	rev.backend = *backend;
	bpf_map_update_elem(&reverse, &rev, &vip, 0);
	write_addr(ctx, backend, v6);
	count(slot);
	return 1;
}

/* backend -> VIP, for the sockets this balancer translated. */
static __always_inline int reverse_xlate(struct bpf_sock_addr *ctx, int v6, __u32 slot)
{
	struct rev_key rev = {};
	struct lb_addr *vip;

	read_addr(ctx, &rev.backend, v6);
	rev.cookie = bpf_get_socket_cookie(ctx);
	vip = bpf_map_lookup_elem(&reverse, &rev);
	if (!vip)
		return 1;
	write_addr(ctx, vip, v6);
	count(slot);
	return 1;
}

SEC("cgroup/connect4")
int lb_connect4(struct bpf_sock_addr *ctx) { return translate(ctx, 0, 0); }

SEC("cgroup/connect6")
int lb_connect6(struct bpf_sock_addr *ctx) { return translate(ctx, 1, 1); }

SEC("cgroup/sendmsg4")
int lb_sendmsg4(struct bpf_sock_addr *ctx) { return translate(ctx, 0, 2); }

SEC("cgroup/sendmsg6")
int lb_sendmsg6(struct bpf_sock_addr *ctx) { return translate(ctx, 1, 3); }

SEC("cgroup/getpeername4")
int lb_getpeername4(struct bpf_sock_addr *ctx) { return reverse_xlate(ctx, 0, 4); }

SEC("cgroup/getpeername6")
int lb_getpeername6(struct bpf_sock_addr *ctx) { return reverse_xlate(ctx, 1, 5); }

SEC("cgroup/recvmsg4")
int lb_recvmsg4(struct bpf_sock_addr *ctx) { return reverse_xlate(ctx, 0, 6); }

SEC("cgroup/recvmsg6")
int lb_recvmsg6(struct bpf_sock_addr *ctx) { return reverse_xlate(ctx, 1, 7); }

char LICENSE[] SEC("license") = "Dual BSD/GPL";
