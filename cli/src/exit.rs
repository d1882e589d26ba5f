//! Exit codes a node agent can act on, and which error gets which.

use meshbpf::Error;

pub const FAILURE: u8 = 1;
pub const NOT_ATTACHED: u8 = 3;
pub const PERMISSION: u8 = 4;
pub const KERNEL: u8 = 5;
pub const BAD_INPUT: u8 = 6;

/// The exit code for a command that failed with `err`.
pub fn code(err: &anyhow::Error) -> u8 {
    match err.downcast_ref::<Error>() {
        Some(Error::NotAttached { .. }) => NOT_ATTACHED,
        Some(Error::PermissionDenied { .. } | Error::LoadRefused { .. }) => PERMISSION,
        Some(Error::MissingKernelFeature { .. } | Error::VerifierRejected { .. }) => KERNEL,
        Some(
            Error::NetnsNotFound { .. }
            | Error::NotANetns { .. }
            | Error::HostNetns { .. }
            | Error::CgroupNotFound { .. }
            | Error::CgroupNotV2 { .. }
            | Error::BpffsNotMounted { .. }
            | Error::PinDirUnsafe { .. }
            | Error::PinDirTaken { .. }
            | Error::NotOurPinDir { .. }
            | Error::AttachedElsewhere { .. }
            | Error::InvalidSetting(_)
            | Error::NotRegistered { .. }
            | Error::NotBindMode { .. }
            | Error::NoInboundListeners { .. }
            | Error::CniConfig { .. }
            | Error::CniConfigLink { .. },
        ) => BAD_INPUT,
        _ => FAILURE,
    }
}
