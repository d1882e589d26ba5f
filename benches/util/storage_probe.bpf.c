// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * For the benchmark only (scripts/bench.sh, its bpf phase): a connect4 program that does one
 * thing, create the connecting socket's storage with meshbpf's `struct sock_state` as its
 * value, as meshbpf's connect4 does for every connection it captures (the original
 * destination must live with the socket: getpeername() reports it, sockops publishes it).
 * Attached alone in a pod with no sidecar, its cost per call is what that one allocation
 * costs, the stats' own cost included: a lower bound on what capture can cost per new
 * connection, besides the calls the kernel makes anyway.
 */
#include "vmlinux.h"
#include "meshbpf.h"
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
} probe_storage SEC(".maps");

SEC("cgroup/connect4")
int storage_only(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (sk)
		bpf_sk_storage_get(&probe_storage, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
