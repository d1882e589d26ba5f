// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Publishes the original destination of each captured connection, keyed by
 * its 4-tuple and netns cookie, once the connection is established, so that
 * the proxy's end can find it; removes it when the proxy's end closes.
 *
 * Why the proxy's end: an application may connect, send and close before the
 * proxy even accepts; behind iptables the conntrack entry outlives that, so
 * here the entry lives until the socket that asks for it (the accepted one)
 * is gone.
 *
 * It also puts captured loopback connections into sock_hash for the sockmap
 * fast path, and, in pods that opted in, the sidecars' ends of connections
 * between two pods of the node (see below).
 */
#include "common.bpf.h"

static __always_inline void conn_key_from_ops(struct conn_key *key, struct bpf_sock_ops *skops,
					      bool local_is_src, __u64 netns_cookie)
{
	__u16 local_port = bpf_htons((__u16)skops->local_port);
	/* remote_port is the be16 port widened so that ntohl() yields the host-order port */
	__u16 remote_port = bpf_htons((__u16)bpf_ntohl(skops->remote_port));
	__u32 *src = local_is_src ? key->src_addr : key->dst_addr;
	__u32 *dst = local_is_src ? key->dst_addr : key->src_addr;

	key->family = skops->family;
	if (skops->family == AF_INET) {
		src[0] = skops->local_ip4;
		dst[0] = skops->remote_ip4;
	} else {
		src[0] = skops->local_ip6[0];
		src[1] = skops->local_ip6[1];
		src[2] = skops->local_ip6[2];
		src[3] = skops->local_ip6[3];
		dst[0] = skops->remote_ip6[0];
		dst[1] = skops->remote_ip6[1];
		dst[2] = skops->remote_ip6[2];
		dst[3] = skops->remote_ip6[3];
	}
	key->src_port = local_is_src ? local_port : remote_port;
	key->dst_port = local_is_src ? remote_port : local_port;
	key->netns_cookie = netns_cookie;
	conn_key_normalize(key);
}

/* Set before load by `meshbpf attach --no-sockmap` (false): no socket enters sock_hash. */
const volatile bool sockmap_enabled = true;

/*
 * Whether the socket's local (remote) end is a loopback address: 127.0.0.0/8, ::1, or
 * IPv4-mapped 127.0.0.0/8. The ends are asked apart: a captured application socket may have
 * any local address, its sidecar's end any remote one (publish_origin).
 */
static __always_inline bool ops_local_is_loopback(struct bpf_sock_ops *skops)
{
	if (skops->family == AF_INET)
		return is_loopback4(skops->local_ip4);
	if (skops->family == AF_INET6) {
		__u32 local[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
				   skops->local_ip6[3] };

		return is_loopback6(local);
	}
	return false;
}

static __always_inline bool ops_remote_is_loopback(struct bpf_sock_ops *skops)
{
	if (skops->family == AF_INET)
		return is_loopback4(skops->remote_ip4);
	if (skops->family == AF_INET6) {
		__u32 remote[4] = { skops->remote_ip6[0], skops->remote_ip6[1],
				    skops->remote_ip6[2], skops->remote_ip6[3] };

		return is_loopback6(remote);
	}
	return false;
}

static __always_inline bool ops_is_loopback(struct bpf_sock_ops *skops)
{
	return ops_local_is_loopback(skops) && ops_remote_is_loopback(skops);
}

/*
 * Sockmap acceleration of captured connections, application -> sidecar only.
 *
 * Both ends enter sock_hash: the application's end so that sk_msg sees its
 * sends, the sidecar's accepted end as the target they are redirected into.
 * Only the application's sends are redirected. Redirected bytes land in the
 * receiver's sockmap queue, which splice(2) cannot see (it returns 0, the data
 * stays unread) and where a blocking read can fail with EAGAIN on a spurious
 * wakeup (measured on 6.18, KERNEL-NOTES.md). The application may do either,
 * so nothing is ever redirected toward it: the sidecar's replies take the
 * normal stack. The sidecar, a known program, reads with non-blocking sockets
 * and without splice (as Envoy does); a sidecar that does not opts its pod out
 * with `register --no-sockmap`.
 *
 * Only connections that connect4/6 captured, never other loopback traffic,
 * and never a connection that leaves the pod: that crosses the veth, where
 * network policy is enforced, and must keep doing so.
 */
/* For a captured connection's end (on loopback) in a registered pod. */
static __always_inline bool sockmap_wanted(const struct pod_settings *pod)
{
	return sockmap_enabled && (pod->flags & POD_F_SOCKMAP);
}

static __always_inline bool sockmap_add(struct bpf_sock_ops *skops, __u64 netns_cookie)
{
	struct conn_key key = {};

	conn_key_from_ops(&key, skops, true, netns_cookie);
	if (bpf_sock_hash_update(skops, &sock_hash, &key, BPF_NOEXIST)) {
		count(CNT_SOCKMAP_ADD_FAILED);
		return false;
	}
	count(CNT_SOCKMAP_ADDED);
	return true;
}

/* The application's end of a captured connection, now established; whether it entered
 * sock_hash. Whether its pod wants that was noted when its origin was published. */
static __always_inline bool accelerate_sender(struct bpf_sock_ops *skops, struct sock_state *state)
{
	__u64 cookie;

	if (!sockmap_enabled || !(state->flags & SOCK_F_SOCKMAP_WANTED))
		return false;
	/* Its TCP Fast Open SYN carried data on the normal stack: the sidecar would read later,
	 * redirected messages before it. */
	if (skops->data_segs_out)
		return false;
	cookie = bpf_get_netns_cookie(skops);
	if (!sockmap_add(skops, cookie))
		return false;
	state->flags |= SOCK_F_SOCKMAP_SENDER;
	trace(TRACE_HOOK_SOCKOPS, TRACE_SOCKMAP_ADDED, cookie, IPPROTO_TCP,
	      &state->dst, NULL, false);
	/* STATE: to leave sock_hash when it shuts down writing (sockmap_leave). RTT: to leave it
	 * after a small first message, at that message's ACK (sockmap_first_ack). */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG |
						 BPF_SOCK_OPS_RTT_CB_FLAG);
	return true;
}

/* The socket's meshbpf state, if it has any. */
static __always_inline struct sock_state *ops_state(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;

	return sk ? bpf_sk_storage_get(&sk_storage_map, sk, 0, 0) : NULL;
}

/* Takes the socket out of sock_hash; returns whether it was there. */
static __always_inline bool sock_hash_remove(struct bpf_sock_ops *skops)
{
	struct conn_key key = {};

	conn_key_from_ops(&key, skops, true, bpf_get_netns_cookie(skops));
	return bpf_map_delete_elem(&sock_hash, &key) == 0;
}

/*
 * The application's end stops sending (shutdown(SHUT_WR) or close): it leaves
 * sock_hash, so that its reads from now on are plain TCP reads. Nothing was
 * ever redirected into it, so nothing is queued there to lose.
 */
static __always_inline void sockmap_leave(struct bpf_sock_ops *skops, struct sock_state *state)
{
	if (!state || !(state->flags & (SOCK_F_SOCKMAP_SENDER | SOCK_F_SOCKMAP_LEAVE)))
		return;
	state->flags &= ~(SOCK_F_SOCKMAP_SENDER | SOCK_F_SOCKMAP_LEAVE);
	if (!sock_hash_remove(skops))
		return;
	count(CNT_SOCKMAP_LEFT_ON_SHUTDOWN);
	trace(TRACE_HOOK_SOCKOPS, TRACE_SOCKMAP_LEFT_SHUTDOWN, bpf_get_netns_cookie(skops),
	      IPPROTO_TCP, &state->dst, NULL, false);
}

/*
 * An ACK reached the application's end. Once sk_msg has seen the first
 * message, the RTT callbacks are no longer needed; if that message was small,
 * the socket leaves sock_hash now, so that the rest of the connection pays
 * nothing for sockmap.
 */
static __always_inline void sockmap_first_ack(struct bpf_sock_ops *skops)
{
	struct sock_state *state = ops_state(skops);

	if (state && (state->flags & SOCK_F_SOCKMAP_SENDER) &&
	    !(state->flags & SOCK_F_SOCKMAP_REDIRECT))
		return; /* no message yet: the handshake's own ACK */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
	if (!state || !(state->flags & SOCK_F_SOCKMAP_LEAVE))
		return;
	state->flags &= ~SOCK_F_SOCKMAP_LEAVE;
	sock_hash_remove(skops);
}

/*
 * Application side, its SYN about to leave: publish what connect4/6 kept. Not later: with
 * TCP Fast Open the sidecar's end exists at the SYN, and a proxy may accept it and ask
 * SO_ORIGINAL_DST before this end is ever told it is established.
 */
static __always_inline void publish_origin(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct pod_settings *pod;
	struct conn_key key = {};
	struct sock_state *state;
	struct orig_dst dst;
	__u64 cookie;

	if (!sk)
		return;
	state = bpf_sk_storage_get(&sk_storage_map, sk, 0, 0);
	if (!state || !state->dst.family)
		return;
	/*
	 * Only a connection to the pod's sidecar carries an original destination: to loopback,
	 * where connect4/6 sent it. From any local address: an application that bound one of
	 * its pod's addresses (curl --interface, Go's Dialer.LocalAddr) keeps it as its source,
	 * and the connection still goes over lo (the route to 127.0.0.1 / ::1 is lo's whatever
	 * the source, for a socket not bound to an interface), as it does behind iptables'
	 * REDIRECT, which changes only the destination.
	 */
	cookie = bpf_get_netns_cookie(skops);
	pod = lookup_pod(cookie);
	if (!pod || !ops_remote_is_loopback(skops) ||
	    !is_sidecar_port(pod, (__u16)bpf_ntohl(skops->remote_port)))
		return;
	dst = state->dst;
	orig_dst_normalize(&dst);
	conn_key_from_ops(&key, skops, true, cookie);
	if (bpf_map_update_elem(&origin_dst_map, &key, &dst, BPF_ANY)) {
		count(CNT_ORIGIN_UPDATE_FAILED);
		return;
	}
	count(CNT_ORIGIN_RECORDED);
	trace(TRACE_HOOK_SOCKOPS, TRACE_ORIGIN_PUBLISHED, key.netns_cookie, IPPROTO_TCP, &dst, NULL,
	      false);
	/* Until established, its own close removes the entry: a connect that fails has no
	 * sidecar end to do it. */
	state->flags |= SOCK_F_ORIGIN_PENDING;
	if (sockmap_wanted(pod))
		state->flags |= SOCK_F_SOCKMAP_WANTED;
	else
		state->flags &= ~SOCK_F_SOCKMAP_WANTED;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/*
 * Application side, established: from now on the sidecar's end owns the entry. A captured
 * connection whose connect the previous build's sockops saw (it published here, at
 * ACTIVE_ESTABLISHED) is published now: during an upgrade, programs of two builds run side
 * by side for a moment.
 */
static __always_inline void app_established(struct bpf_sock_ops *skops)
{
	struct sock_state *state = ops_state(skops);

	if (!state || !state->dst.family)
		return;
	if (!(state->flags & SOCK_F_ORIGIN_PENDING)) {
		publish_origin(skops);
		if (!(state->flags & SOCK_F_ORIGIN_PENDING))
			return; /* not a connection to the sidecar */
	}
	state->flags &= ~SOCK_F_ORIGIN_PENDING;
	if (!accelerate_sender(skops, state))
		bpf_sock_ops_cb_flags_set(skops,
					  skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Proxy side: if this accepted socket is a captured connection, watch it to clean up. */
static __always_inline void watch_proxy_end(struct bpf_sock_ops *skops)
{
	struct pod_settings *pod;
	struct conn_key key = {};
	__u64 cookie;

	/* Every accepted socket of the node passes here: what cannot be a sidecar's end of a
	 * captured connection (on loopback, at a sidecar port, in a registered pod) leaves
	 * before the connection key is built. Its peer, the application, may have any of its
	 * pod's addresses (publish_origin). */
	if (!ops_local_is_loopback(skops))
		return;
	cookie = bpf_get_netns_cookie(skops);
	pod = lookup_pod(cookie);
	if (!pod || !is_sidecar_port(pod, (__u16)skops->local_port))
		return;
	conn_key_from_ops(&key, skops, false, cookie);
	if (!bpf_map_lookup_elem(&origin_dst_map, &key))
		return;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	/* The target the application's sends are redirected into. */
	if (sockmap_wanted(pod))
		sockmap_add(skops, cookie);
}

/* Removes the connection's entry; `app_end`: skops is the application's end. */
static __always_inline void forget_origin(struct bpf_sock_ops *skops, bool app_end)
{
	struct conn_key key = {};

	conn_key_from_ops(&key, skops, app_end, bpf_get_netns_cookie(skops));
	if (!bpf_map_delete_elem(&origin_dst_map, &key))
		count(CNT_ORIGIN_REMOVED);
}

static __always_inline void state_changed(struct bpf_sock_ops *skops, __u32 old_state,
					  __u32 new_state)
{
	struct sock_state *state = ops_state(skops);

	if (state && (state->flags & SOCK_F_ORIGIN_PENDING)) {
		/* The application's end, never established: its connect failed. */
		if (new_state == BPF_TCP_CLOSE && old_state == BPF_TCP_SYN_SENT) {
			state->flags &= ~SOCK_F_ORIGIN_PENDING;
			forget_origin(skops, true);
		}
		return;
	}
	if (new_state == BPF_TCP_FIN_WAIT1 || new_state == BPF_TCP_CLOSE)
		sockmap_leave(skops, state);
	/*
	 * The sidecar's end is done with the entry once it reaches CLOSE, or LAST_ACK: the
	 * application's FIN came in and the sidecar sent its own (it closed or shut down
	 * writing after the end of the stream); what is left is the kernel waiting for the
	 * last ACK. That ACK may never come before 6.18 (measured on 6.1.0-57 and 6.12.95):
	 * an application bound to its pod's IPv6 address that closed first is a TIME-WAIT
	 * socket by then, whose ACK to [::1] (tcp_v6_send_response(), the reply of a socket
	 * no longer full) goes unanswered, so the sidecar's end retransmits its FIN in
	 * LAST_ACK for minutes (tcp_retries2) and only then reaches CLOSE.
	 */
	if (new_state == BPF_TCP_CLOSE || new_state == BPF_TCP_LAST_ACK)
		forget_origin(skops, false);
}

/*
 * Intra-node acceleration (pods registered with --intra-node): a TCP connection whose two
 * ends are the sidecars of two registered pods of this node goes socket to socket, both
 * ways: each end's sends are redirected into the other's receive queue by sk_msg, skipping
 * both pods' veths, the bridge, netfilter and tc, and both TCP/IP stacks. The handshake
 * and the FIN still take the wire, so NetworkPolicy decides at connect as before; the bytes
 * after it bypass everything a packet would meet.
 *
 * Which sockets: an established, non-loopback TCP socket is one end when
 *  - its pod opted in, and so did the pod that owns its remote address (pod_addrs: a
 *    registered pod of this node, not itself; the host, other nodes and unregistered pods
 *    own no entry there, so their connections are never touched);
 *  - its local address is its own pod's, and pod_addrs says so (an address two pods
 *    registered belongs to the newer one), which keeps the two ends' keys unique (below);
 *  - it belongs to a sidecar: its owner (sk_uid) is one of the pod's proxy uids. sockops
 *    has no current task, but the socket keeps the uid that created it, and an accepted
 *    socket the uid of its listener (sock_copy at the SYN, sock_graft at accept: the
 *    acceptor's), so the sidecar's upstream connect and what the sidecar's listener
 *    accepted are told from an application's sockets in the same way. An application
 *    socket never enters, so it never receives redirected bytes: its splice and blocking
 *    reads behave (KERNEL-NOTES.md).
 *  - no byte has taken TCP yet: a TCP Fast Open SYN carrying data (the passive end is
 *    made from the SYN; the active end sent data in it) is left out, or the peer would
 *    read later redirected bytes before the ones still in its TCP queue.
 * The key is the 4-tuple with cookie 0. Both ends compute the other's key from their own
 * 4-tuple (no NAT between two pods of a node: connect4 leaves a sidecar's connects alone,
 * and sk_lookup keeps the original local address), and no netns cookie is known to both.
 * Two sockets with the same key would need the same local address in two namespaces,
 * which pod_addrs rules out; loopback keys carry a netns cookie, never 0.
 *
 * The sidecar requirement is the loopback path's, now on both sides: sidecars read
 * non-blocking (a sockmap receive may report EAGAIN on a blocking socket after a spurious
 * wakeup) and without splice (it sees only TCP's queue). Envoy and HAProxy (without
 * option splice-*) do.
 *
 * An end stays in sock_hash until it closes, also after a shutdown: the peer may be
 * redirecting into it, and leaving the map drops what its queue holds. Its sends are
 * decided by its first message (sockmap.bpf.c).
 */
/*
 * The socket's local and remote addresses as pod_addrs keys. The barrier keeps clang from
 * merging the two families' stores into one store of a load from a computed ctx offset,
 * which the verifier refuses.
 */
static __always_inline void ops_addrs(struct bpf_sock_ops *skops, struct pod_addr_key *local,
				      struct pod_addr_key *remote)
{
	if (skops->family == AF_INET) {
		local->addr[2] = V4_MAPPED_PREFIX;
		local->addr[3] = skops->local_ip4;
		remote->addr[2] = V4_MAPPED_PREFIX;
		remote->addr[3] = skops->remote_ip4;
		asm volatile("" ::: "memory");
		return;
	}
	local->addr[0] = skops->local_ip6[0];
	local->addr[1] = skops->local_ip6[1];
	local->addr[2] = skops->local_ip6[2];
	local->addr[3] = skops->local_ip6[3];
	remote->addr[0] = skops->remote_ip6[0];
	remote->addr[1] = skops->remote_ip6[1];
	remote->addr[2] = skops->remote_ip6[2];
	remote->addr[3] = skops->remote_ip6[3];
}

/* The registered pod that owns an address: its cookie, or 0. */
static __always_inline __u64 addr_owner(const struct pod_addr_key *key)
{
	__u64 *cookie = bpf_map_lookup_elem(&pod_addrs, key);

	return cookie ? *cookie : 0;
}

/* Whether the socket was made by (or accepted for) one of the pod's proxy uids. */
static __always_inline bool owned_by_proxy(struct bpf_sock *sk, const struct pod_settings *pod,
					   __u64 cookie)
{
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	__u32 uid;

	if (!tp)
		return false;
	uid = tp->inet_conn.icsk_inet.sk.sk_uid.val;
	return uid == pod->proxy_uid ||
	       ((pod->flags & POD_F_MORE_PROXY_IDS) && pod_rule(pod, cookie, uid, RULE_PROXY_UID));
}

#define TCP_FLAG_SYN 0x02

/* An established socket that may be a sidecar's end of an intra-node connection. */
static __always_inline void intra_node_admit(struct bpf_sock_ops *skops, bool active)
{
	struct pod_addr_key local = {}, remote = {};
	struct bpf_sock *sk = skops->sk;
	struct pod_settings *pod, *peer_pod;
	struct conn_key key = {};
	struct sock_state *state;
	__u64 cookie, peer;

	if (!sockmap_enabled || !sk || ops_is_loopback(skops))
		return;
	cookie = bpf_get_netns_cookie(skops);
	pod = lookup_pod(cookie);
	if (!pod || !(pod->flags & POD_F_INTRA_NODE))
		return;
	ops_addrs(skops, &local, &remote);
	peer = addr_owner(&remote);
	if (!peer || peer == cookie || addr_owner(&local) != cookie)
		return;
	peer_pod = lookup_pod(peer);
	if (!peer_pod || !(peer_pod->flags & POD_F_INTRA_NODE) ||
	    !owned_by_proxy(sk, pod, cookie))
		return;
	if (active ? skops->data_segs_out != 0 : (skops->skb_tcp_flags & TCP_FLAG_SYN) != 0) {
		count(CNT_INTRA_NODE_SKIP_FAST_OPEN);
		return;
	}
	state = bpf_sk_storage_get(&sk_storage_map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		count(CNT_STORAGE_FAILED);
		return;
	}
	conn_key_from_ops(&key, skops, true, 0);
	state->flags = (state->flags & ~(SOCK_F_INTRA_NODE_PLAIN | SOCK_F_SOCKMAP_REDIRECT)) |
		       SOCK_F_INTRA_NODE;
	if (bpf_sock_hash_update(skops, &sock_hash, &key, BPF_NOEXIST)) {
		state->flags &= ~SOCK_F_INTRA_NODE;
		count(CNT_INTRA_NODE_ADD_FAILED);
		return;
	}
	count(CNT_INTRA_NODE_ADDED);
}

/*
 * A socket starts listening: the sidecar's listeners, and applications' dual-stack
 * listeners moved to [::1], go into `listeners`, where the pod's sk_lookup program finds
 * them (lookup.bpf.c).
 */
static __always_inline void listening(struct bpf_sock_ops *skops)
{
	struct sock_state *state = ops_state(skops);
	struct listener_key key = {};

	if (!state || !(state->flags & (SOCK_F_PROXY_BOUND | SOCK_F_DUAL_WILDCARD)))
		return;
	key.netns_cookie = bpf_get_netns_cookie(skops);
	key.port = (__u16)skops->local_port;
	key.family = skops->family;
	key.owner = (state->flags & SOCK_F_PROXY_BOUND) ? LISTENER_PROXY : LISTENER_APP;
	if (bpf_sock_hash_update(skops, &listeners, &key, BPF_ANY))
		count(CNT_LISTENER_ADD_FAILED);
	else
		count(CNT_LISTENER_ADDED);
}

SEC("sockops")
int handle__sockops(struct bpf_sock_ops *skops)
{
	__u32 old_state, new_state;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		publish_origin(skops);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		app_established(skops);
		intra_node_admit(skops, true);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		watch_proxy_end(skops);
		intra_node_admit(skops, false);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		listening(skops);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		sockmap_first_ack(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[0] is the old state, args[1] the new one; each read once (the verifier
		 * refuses a recomputed ctx offset) */
		old_state = skops->args[0];
		new_state = skops->args[1];
		state_changed(skops, old_state, new_state);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
