// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The one definition of every map; the other objects declare them extern. */
#define MESHBPF_DEFINE_MAPS
#include "common.bpf.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
