// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Sockmap fast path from an application to its sidecar: each message the
 * application's end of a captured connection sends goes straight into the
 * receive queue of the sidecar's end (bpf_msg_redirect_hash with
 * BPF_F_INGRESS), skipping the loopback TCP/IP stack. sockops.bpf.c decides
 * which sockets enter sock_hash and explains why only this direction.
 *
 * Which connections: measured on 6.18 (docs/src/acceleration.md), redirecting per message
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
 *
 * The other way round is safe: once messages were redirected, the later ones may take the
 * normal stack, behind them, for the receiver reads its sockmap queue before its TCP queue.
 * Detach does that (draining), and so does flow control (receiver_behind).
 */
#include "common.bpf.h"
#include <bpf/bpf_core_read.h>

/* Set before load when sk_msg programs may read kernel memory (bpf_probe_read_kernel).
 * sk_rmem_alloc is the kernel's macro for sk_backlog.rmem_alloc. */
const volatile bool receivers_readable = false;

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

/*
 * Flow control. A redirected message waits in its receiver's sockmap queue, which the
 * kernel charges to the receiver (sk_rmem_alloc) but does not bound by a receive buffer as
 * TCP does: a sender faster than its reader would queue without limit (measured: 256 MiB
 * into a sidecar that read nothing, where TCP stops the sender after 5-7 MB), until the
 * node's TCP memory runs short and writes fail with ENOMEM. So once the receiver holds more
 * unread than TCP would ever let it (its receive buffer, or, unless SO_RCVBUF fixed that,
 * the most autotuning grows it to: net.ipv4.tcp_rmem's maximum), or once the node's TCP
 * memory is under pressure (where TCP makes a sender wait and a redirect fails with
 * ENOMEM), the sender's later messages take the normal stack for good, behind the
 * redirected ones and under TCP's flow control; the receiver's window counts its sockmap
 * queue too. The message being redirected goes in any case: the queue stays within that
 * bound plus one message.
 *
 * Which socket receives: bpf_msg_redirect_hash() has just put it into the kernel's sk_msg,
 * which is this program's context (`sk_redir`). Its fields are read with
 * bpf_probe_read_kernel, racing harmlessly with the receiver's reads; the common case (a
 * receiver within its receive buffer) costs three reads.
 */
#define SOCK_RCVBUF_LOCK 2

static __always_inline bool receiver_behind(struct sk_msg_md *msg, __u32 size)
{
	unsigned long *pressure = NULL, pressed = 0;
	struct sock *receiver = NULL;
	int queued = 0, room = 0, most = 0;
	struct proto *prot = NULL;
	struct net *net = NULL;

	if (!receivers_readable)
		return false;
	if (bpf_probe_read_kernel(&receiver, sizeof(receiver),
				  (void *)msg + bpf_core_field_offset(struct sk_msg, sk_redir)) ||
	    !receiver)
		return false;
	if (bpf_core_read(&queued, sizeof(queued), &receiver->sk_backlog.rmem_alloc.counter) ||
	    bpf_core_read(&room, sizeof(room), &receiver->sk_rcvbuf))
		return false;
	if ((__s64)queued + size <= room)
		return false;
	if (!(BPF_CORE_READ_BITFIELD_PROBED(receiver, sk_userlocks) & SOCK_RCVBUF_LOCK) &&
	    !bpf_core_read(&net, sizeof(net), &receiver->__sk_common.skc_net.net) && net &&
	    !bpf_core_read(&most, sizeof(most), &net->ipv4.sysctl_tcp_rmem[2]) && most > room)
		room = most;
	if ((__s64)queued + size > room)
		return true;
	return !bpf_core_read(&prot, sizeof(prot), &receiver->__sk_common.skc_prot) && prot &&
	       !bpf_core_read(&pressure, sizeof(pressure), &prot->memory_pressure) && pressure &&
	       !bpf_probe_read_kernel(&pressed, sizeof(pressed), pressure) && pressed;
}

/* After a redirect: if its receiver is behind, the sender's next messages take TCP. */
static __always_inline void check_receiver(struct sk_msg_md *msg, struct sock_state *state,
					   __u32 size, __u16 plain_flag)
{
	if (!receiver_behind(msg, size))
		return;
	state->flags |= plain_flag;
	count(CNT_SOCKMAP_RECEIVER_BEHIND);
	trace(TRACE_HOOK_SK_MSG, TRACE_SOCKMAP_LEFT_BEHIND, bpf_get_netns_cookie(msg), IPPROTO_TCP,
	      &state->dst, NULL, false);
}

/* Out of sock_hash for good: sockops removes it at the ACK of this message (sockmap_first_ack). */
static __always_inline void leave_for_good(struct sock_state *state)
{
	state->flags = (state->flags & ~SOCK_F_SOCKMAP_SENDER) | SOCK_F_SOCKMAP_LEAVE;
}

/* The connection's first message: large enough to gain from acceleration, or it leaves. */
static __always_inline bool first_message_large(struct sk_msg_md *msg, struct sock_state *state)
{
	struct pod_settings *pod = lookup_pod(bpf_get_netns_cookie(msg));

	if (pod && msg->size >= pod->sockmap_min_bytes)
		return true;
	leave_for_good(state);
	count(CNT_SOCKMAP_LEFT_SMALL_FIRST_MSG);
	trace(TRACE_HOOK_SK_MSG, TRACE_SOCKMAP_LEFT_SMALL, bpf_get_netns_cookie(msg), IPPROTO_TCP,
	      &state->dst, NULL, false);
	return false;
}

/*
 * A message of a sidecar's end of an intra-node connection. Once one took the normal
 * stack, all do, so that the peer never reads bytes out of order; once a message was
 * redirected, all are, until detach drains or the peer falls behind (receiver_behind).
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
	check_receiver(msg, state, size, SOCK_F_INTRA_NODE_PLAIN);
	return SK_PASS;
}

SEC("sk_msg")
int handle__sk_msg(struct sk_msg_md *msg)
{
	struct conn_key peer = {};
	struct sock_state *state;
	__u32 size = msg->size;
	long verdict;
	bool first;

	state = msg->sk ? bpf_sk_storage_get(&sk_storage_map, msg->sk, 0, 0) : NULL;
	if (state && (state->flags & SOCK_F_INTRA_NODE))
		return intra_node_send(msg, state);
	/* The sidecar's end is in sock_hash as a target; its own sends take the normal path. */
	if (!state || !(state->flags & SOCK_F_SOCKMAP_SENDER) ||
	    (state->flags & SOCK_F_SOCKMAP_BEHIND))
		return SK_PASS;
	first = !(state->flags & SOCK_F_SOCKMAP_REDIRECT);
	if (first && !first_message_large(msg, state))
		return SK_PASS;
	/*
	 * Only a first message that was redirected makes the connection redirect: one that took
	 * the normal stack (detach draining, or the sidecar's end not in sock_hash yet, its
	 * handshake's last ACK still unprocessed on a busy machine) would otherwise be read
	 * after the redirected ones that follow it. Then the connection leaves for good.
	 */
	if (draining()) {
		if (first)
			leave_for_good(state);
		return SK_PASS;
	}

	/* The peer's own end is our remote end: its key has src and dst swapped. */
	msg_key(&peer, msg, false);

	verdict = bpf_msg_redirect_hash(msg, &sock_hash, &peer, BPF_F_INGRESS);
	if (verdict != SK_PASS) {
		/* The peer left sock_hash (closing), or is not there yet: the normal path carries
		 * it, behind what was redirected, which the peer reads first. */
		count(CNT_SOCKMAP_MSG_NO_PEER);
		if (first)
			leave_for_good(state);
		return SK_PASS;
	}
	state->flags |= SOCK_F_SOCKMAP_REDIRECT;
	count(CNT_SOCKMAP_MSG_REDIRECTED);
	count_n(CNT_SOCKMAP_BYTES_REDIRECTED, size);
	check_receiver(msg, state, size, SOCK_F_SOCKMAP_BEHIND);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
