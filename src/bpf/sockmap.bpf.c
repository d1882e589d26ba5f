// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Sockmap fast path from an application to its sidecar: each message the
 * application's end of a captured connection sends goes straight into the
 * receive queue of the sidecar's end (bpf_msg_redirect_hash with
 * BPF_F_INGRESS), skipping the loopback TCP/IP stack. sockops.bpf.c decides
 * which sockets enter sock_hash and explains why only this direction.
 *
 * Which connections: measured on 6.18 (README), redirecting per message
 * loses badly against loopback TCP for streams of small writes (TCP batches
 * them; sk_msg pays per message) and wins for large ones; merely staying in
 * sock_hash without redirecting costs too. A connection's path cannot change
 * once bytes are in flight (the peer would read the redirected bytes before
 * earlier ones still queued by TCP), so the first message decides, before any
 * byte has left: at least the pod's sockmap_min_bytes and the connection is
 * accelerated for good; smaller, and the socket leaves sock_hash for good
 * (sk_msg may not delete from a sockmap: sockops does, at the RTT callback
 * that the first message's ACK triggers).
 *
 * The sidecars' ends of an intra-node connection (sockops.bpf.c) redirect both ways, each
 * into the other's receive queue. Their first message decides too, by whether the peer is
 * there: a sidecar may send before its peer's end is established (the handshake's last ACK
 * still crossing the bridge), and then that direction stays on the normal stack for good.
 * Neither ever leaves sock_hash before it closes: its peer may be redirecting into it.
 */
#include "common.bpf.h"

/*
 * `meshbpf detach` is under way: from now on messages take the normal stack,
 * behind what was redirected already (the receiver reads its sockmap queue
 * first), so the sidecars can read that before sock_hash, and the queues with
 * it, go away.
 */
static __always_inline bool draining(void)
{
	__u32 zero = 0;
	struct mesh_meta *meta = bpf_map_lookup_elem(&meta_map, &zero);

	return meta && (meta->flags & META_F_DRAINING);
}

/*
 * sockops' conn_key_from_ops for an sk_msg context. One body for both (a macro over either
 * context) is refused by the verifier for sk_msg: clang reads local_ip6 through a register
 * holding msg + offset, a "modified ctx ptr" (measured with clang 19 on 6.18).
 */
static __always_inline void msg_key(struct conn_key *key, struct sk_msg_md *msg, bool local_is_src)
{
	__u32 *local = local_is_src ? key->src_addr : key->dst_addr;
	__u32 *remote = local_is_src ? key->dst_addr : key->src_addr;
	/* remote_port is the be16 port widened so that ntohl() yields the host-order port */
	__u16 local_port = bpf_htons((__u16)msg->local_port);
	__u16 remote_port = bpf_htons((__u16)bpf_ntohl(msg->remote_port));

	key->family = msg->family;
	if (msg->family == AF_INET) {
		local[0] = msg->local_ip4;
		remote[0] = msg->remote_ip4;
	} else {
		local[0] = msg->local_ip6[0];
		local[1] = msg->local_ip6[1];
		local[2] = msg->local_ip6[2];
		local[3] = msg->local_ip6[3];
		remote[0] = msg->remote_ip6[0];
		remote[1] = msg->remote_ip6[1];
		remote[2] = msg->remote_ip6[2];
		remote[3] = msg->remote_ip6[3];
	}
	key->src_port = local_is_src ? local_port : remote_port;
	key->dst_port = local_is_src ? remote_port : local_port;
	/* bpf_get_netns_cookie() for sk_msg: Linux 5.15 (commit fab60e29fcc6). */
	key->netns_cookie = bpf_get_netns_cookie(msg);
	conn_key_normalize(key);
}

/* The connection's first message: accelerate it for good, or leave sock_hash for good. */
static __always_inline bool first_message_accelerates(struct sk_msg_md *msg, struct sock_state *state)
{
	struct pod_settings *pod = lookup_pod(bpf_get_netns_cookie(msg));

	if (pod && msg->size >= pod->sockmap_min_bytes) {
		state->flags |= SOCK_F_SOCKMAP_REDIRECT;
		return true;
	}
	state->flags = (state->flags & ~SOCK_F_SOCKMAP_SENDER) | SOCK_F_SOCKMAP_LEAVE;
	count(CNT_SOCKMAP_LEFT_SMALL_FIRST_MSG);
	trace(TRACE_HOOK_SK_MSG, TRACE_SOCKMAP_LEFT_SMALL, bpf_get_netns_cookie(msg), IPPROTO_TCP,
	      &state->dst, NULL, false);
	return false;
}

/*
 * A message of a sidecar's end of an intra-node connection. Once a message was redirected,
 * all are (until detach drains), so that the peer never reads bytes out of order; once one
 * took the normal stack, all do.
 */
static __always_inline int intra_node_send(struct sk_msg_md *msg, struct sock_state *state)
{
	bool redirecting = state->flags & SOCK_F_SOCKMAP_REDIRECT;
	struct conn_key peer = {};
	__u32 size = msg->size;

	if (state->flags & SOCK_F_INTRA_NODE_PLAIN)
		return SK_PASS;
	if (draining()) {
		/* Behind what was redirected already, which the peer reads first. */
		if (!redirecting)
			state->flags |= SOCK_F_INTRA_NODE_PLAIN;
		return SK_PASS;
	}
	msg_key(&peer, msg, false);
	peer.netns_cookie = 0;
	if (bpf_msg_redirect_hash(msg, &sock_hash, &peer, BPF_F_INGRESS) != SK_PASS) {
		/* Not there yet (first message), or closing: the normal path carries it. */
		if (!redirecting) {
			state->flags |= SOCK_F_INTRA_NODE_PLAIN;
			count(CNT_INTRA_NODE_NO_PEER);
		}
		return SK_PASS;
	}
	state->flags |= SOCK_F_SOCKMAP_REDIRECT;
	count(CNT_INTRA_NODE_MSG_REDIRECTED);
	count_n(CNT_INTRA_NODE_BYTES_REDIRECTED, size);
	return SK_PASS;
}

SEC("sk_msg")
int handle__sk_msg(struct sk_msg_md *msg)
{
	struct conn_key peer = {};
	struct sock_state *state;
	__u32 size = msg->size;
	long verdict;

	state = msg->sk ? bpf_sk_storage_get(&sk_storage_map, msg->sk, 0, 0) : NULL;
	if (state && (state->flags & SOCK_F_INTRA_NODE))
		return intra_node_send(msg, state);
	/* The sidecar's end is in sock_hash as a target; its own sends take the normal path. */
	if (!state || !(state->flags & SOCK_F_SOCKMAP_SENDER))
		return SK_PASS;
	if (!(state->flags & SOCK_F_SOCKMAP_REDIRECT) && !first_message_accelerates(msg, state))
		return SK_PASS;
	if (draining())
		return SK_PASS;

	/* The peer's own end is our remote end: its key has src and dst swapped. */
	msg_key(&peer, msg, false);

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
