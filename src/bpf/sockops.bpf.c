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
 */
#include "common.bpf.h"

static __always_inline void conn_key_from_ops(struct conn_key *key, struct bpf_sock_ops *skops,
					      bool local_is_src)
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
	key->netns_cookie = bpf_get_netns_cookie(skops);
	conn_key_normalize(key);
}

/* Application side: connect() finished; publish what connect4/6 kept. */
static __always_inline void record_origin(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct conn_key key = {};
	struct sock_state *state;
	struct orig_dst dst;

	if (!sk)
		return;
	state = bpf_sk_storage_get(&sk_storage_map, sk, 0, 0);
	if (!state || !state->dst.family)
		return;
	dst = state->dst;
	orig_dst_normalize(&dst);
	conn_key_from_ops(&key, skops, true);
	if (bpf_map_update_elem(&origin_dst_map, &key, &dst, BPF_ANY)) {
		count(CNT_ORIGIN_UPDATE_FAILED);
		return;
	}
	count(CNT_ORIGIN_RECORDED);
}

/* Proxy side: if this accepted socket is a captured connection, watch it to clean up. */
static __always_inline void watch_proxy_end(struct bpf_sock_ops *skops)
{
	struct conn_key key = {};

	conn_key_from_ops(&key, skops, false);
	if (bpf_map_lookup_elem(&origin_dst_map, &key))
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
						     BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Set before load by `meshbpf attach --no-sockmap` (false): no socket enters sock_hash. */
const volatile bool sockmap_enabled = true;

static __always_inline bool ops_is_loopback(struct bpf_sock_ops *skops)
{
	if (skops->family == AF_INET)
		return is_loopback4(skops->local_ip4) && is_loopback4(skops->remote_ip4);
	if (skops->family == AF_INET6) {
		__u32 local[4] = { skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
				   skops->local_ip6[3] };
		__u32 remote[4] = { skops->remote_ip6[0], skops->remote_ip6[1],
				    skops->remote_ip6[2], skops->remote_ip6[3] };

		return is_loopback6(local) && is_loopback6(remote);
	}
	return false;
}

/*
 * Both ends of a loopback connection inside a registered pod (an application
 * and its sidecar) enter sock_hash; sk_msg then moves their bytes directly.
 * Only loopback: a connection that leaves the pod crosses the veth where
 * network policy is enforced, and must keep doing so.
 */
static __always_inline void accelerate(struct bpf_sock_ops *skops)
{
	struct pod_settings *pod;
	struct conn_key key = {};

	if (!sockmap_enabled || !ops_is_loopback(skops))
		return;
	pod = lookup_pod(bpf_get_netns_cookie(skops));
	if (!pod || !(pod->flags & POD_F_SOCKMAP))
		return;
	conn_key_from_ops(&key, skops, true);
	if (bpf_sock_hash_update(skops, &sock_hash, &key, BPF_NOEXIST)) {
		count(CNT_SOCKMAP_ADD_FAILED);
		return;
	}
	count(CNT_SOCKMAP_ADDED);
}

static __always_inline void forget_origin(struct bpf_sock_ops *skops)
{
	struct conn_key key = {};

	conn_key_from_ops(&key, skops, false);
	if (!bpf_map_delete_elem(&origin_dst_map, &key))
		count(CNT_ORIGIN_REMOVED);
}

SEC("sockops")
int handle__sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		record_origin(skops);
		accelerate(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		watch_proxy_end(skops);
		accelerate(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[1] is the new state */
		if (skops->args[1] == BPF_TCP_CLOSE)
			forget_origin(skops);
		break;
	}
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
