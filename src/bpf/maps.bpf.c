// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The one definition of every map; the other objects declare them extern. */
#define MESHBPF_DEFINE_MAPS
#include "common.bpf.h"

/*
 * Never read: these put the ABI's enums into the object's BTF, from which the skeleton
 * generates their Rust twins (`types::consts`, `types::pod_flag`, ...) and build.rs the
 * counter names.
 */
const volatile struct {
	enum consts consts;
	enum pod_flag pod_flag;
	enum sock_flag sock_flag;
	enum rule_kind rule_kind;
	enum rule_marker rule_marker;
	enum cidr_key_bits cidr_key_bits;
	enum meta_flag meta_flag;
	enum listener_owner listener_owner;
	enum trace_hook trace_hook;
	enum trace_reason trace_reason;
	struct decision_event decision_event;
	enum counter counter;
} meshbpf_abi;

char LICENSE[] SEC("license") = "Dual BSD/GPL";
