// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Sockmap fast path from an application to its sidecar: each message the
 * application's end of a captured connection sends goes straight into the
 * receive queue of the sidecar's end (bpf_msg_redirect_hash with
 * BPF_F_INGRESS), skipping the loopback TCP/IP stack. sockops.bpf.c decides
 * which sockets enter sock_hash and explains why only this direction.
 */
#include "common.bpf.h"

SEC("sk_msg")
int handle__sk_msg(struct sk_msg_md *msg)
{
	struct conn_key peer = {};
	struct sock_state *state;
	__u32 size = msg->size;
	long verdict;

	/* The sidecar's end is in sock_hash as a target; its own sends take the normal path. */
	state = msg->sk ? bpf_sk_storage_get(&sk_storage_map, msg->sk, 0, 0) : NULL;
	if (!state || !(state->flags & SOCK_F_SOCKMAP_SENDER))
		return SK_PASS;

	/* The peer's own end is our remote end: its key has src and dst swapped. */
	peer.family = msg->family;
	if (msg->family == AF_INET) {
		peer.src_addr[0] = msg->remote_ip4;
		peer.dst_addr[0] = msg->local_ip4;
	} else {
		peer.src_addr[0] = msg->remote_ip6[0];
		peer.src_addr[1] = msg->remote_ip6[1];
		peer.src_addr[2] = msg->remote_ip6[2];
		peer.src_addr[3] = msg->remote_ip6[3];
		peer.dst_addr[0] = msg->local_ip6[0];
		peer.dst_addr[1] = msg->local_ip6[1];
		peer.dst_addr[2] = msg->local_ip6[2];
		peer.dst_addr[3] = msg->local_ip6[3];
	}
	/* remote_port is the be16 port widened so that ntohl() yields the host-order port */
	peer.src_port = bpf_htons((__u16)bpf_ntohl(msg->remote_port));
	peer.dst_port = bpf_htons((__u16)msg->local_port);
	/* bpf_get_netns_cookie() for sk_msg: Linux 5.15 (commit fab60e29fcc6). */
	peer.netns_cookie = bpf_get_netns_cookie(msg);
	conn_key_normalize(&peer);

	verdict = bpf_msg_redirect_hash(msg, &sock_hash, &peer, BPF_F_INGRESS);
	if (verdict != SK_PASS) {
		/* The peer left sock_hash (closing, or never entered): the normal path carries it. */
		count(CNT_SOCKMAP_MSG_NO_PEER);
		return SK_PASS;
	}
	count(CNT_SOCKMAP_MSG_REDIRECTED);
	count_n(CNT_SOCKMAP_BYTES_REDIRECTED, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
