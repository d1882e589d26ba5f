//! One pod's capture settings: what `register` stores as the pod's `cookie_map` value.

use crate::abi::{pod_flags, RawPodSettings, NO_GID};
use crate::error::{Error, Result};

/// Istio's sidecar uid (istio-iptables `-u`, default 1337).
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Istio's outbound listener (istio-iptables `-p`, default 15001).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Istio's inbound listener (istio-iptables `-z`, default 15006).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Istio's DNS proxy port (istio-agent, default 15053).
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// What one registered pod wants captured, and where its sidecar listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSettings {
    /// The sidecar's uid: its own sockets are never captured.
    pub proxy_uid: u32,
    /// The sidecar's gid, if its group should be exempt too.
    pub proxy_gid: Option<u32>,
    /// The sidecar's outbound listener on loopback.
    pub outbound_port: u16,
    /// The sidecar's inbound listener.
    pub inbound_port: u16,
    /// The sidecar's DNS listener on loopback.
    pub dns_port: u16,
    /// Capture outbound TCP connections.
    pub capture_outbound: bool,
}

impl Default for PodSettings {
    fn default() -> Self {
        PodSettings {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: None,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            dns_port: DEFAULT_DNS_PORT,
            capture_outbound: true,
        }
    }
}

impl PodSettings {
    /// Checks that the settings make sense; the error names the offending value.
    pub fn validate(&self) -> Result<()> {
        for (name, port) in [
            ("outbound port", self.outbound_port),
            ("inbound port", self.inbound_port),
            ("DNS port", self.dns_port),
        ] {
            if port == 0 {
                return Err(Error::InvalidSetting(format!(
                    "{name} 0: give a port from 1 to 65535"
                )));
            }
        }
        if self.proxy_uid == u32::MAX || self.proxy_gid == Some(NO_GID) {
            return Err(Error::InvalidSetting(
                "proxy uid/gid 4294967295 is not a valid id".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn to_raw(&self) -> RawPodSettings {
        let mut flags = 0;
        if self.capture_outbound {
            flags |= pod_flags::CAPTURE_OUTBOUND;
        }
        RawPodSettings {
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid.unwrap_or(NO_GID),
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            dns_port: self.dns_port,
            _pad: 0,
            flags,
        }
    }

    pub(crate) fn from_raw(raw: &RawPodSettings) -> Self {
        PodSettings {
            proxy_uid: raw.proxy_uid,
            proxy_gid: (raw.proxy_gid != NO_GID).then_some(raw.proxy_gid),
            outbound_port: raw.outbound_port,
            inbound_port: raw.inbound_port,
            dns_port: raw.dns_port,
            capture_outbound: raw.flags & pod_flags::CAPTURE_OUTBOUND != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_istio_s() {
        let s = PodSettings::default();
        assert_eq!(
            (s.proxy_uid, s.outbound_port, s.dns_port),
            (1337, 15001, 15053)
        );
        assert!(s.capture_outbound);
    }

    #[test]
    fn raw_round_trip_keeps_every_field() {
        let s = PodSettings {
            proxy_uid: 2102,
            proxy_gid: Some(2102),
            outbound_port: 4140,
            ..Default::default()
        };
        assert_eq!(PodSettings::from_raw(&s.to_raw()), s);
    }

    #[test]
    fn port_zero_is_refused_by_name() {
        let s = PodSettings {
            outbound_port: 0,
            ..Default::default()
        };
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("outbound port 0"), "{err}");
    }
}
