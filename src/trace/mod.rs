//! Why a connection was, or was not, captured: live from the programs' own decisions
//! ([`Mesh::trace`], a ring buffer per reader, never sampled), and from a pod's pinned
//! settings ([`explain`], the same policy evaluated in Rust). Both speak the same words:
//! [`Reason`]'s.

mod explain;
mod reason;
mod tracer;

pub use explain::{explain, Explanation, Query};
pub use reason::{Hook, Protocol, Reason, TraceEvent};
pub use tracer::{Tracer, TRACE_DRAIN, TRACE_SLOTS};
#[allow(unused_imports)]
use {explain::*, reason::*, tracer::*};
