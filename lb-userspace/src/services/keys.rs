//! How the agent names things in the maps: backend and VIP ids, and the wire form of
//! addresses and VIP keys (addresses in 16 bytes, ports in network byte order).

use std::{collections::BTreeSet, net::IpAddr};

use common::{VipKey, AF_INET, AF_INET6};

use super::{Result, ServiceError};
use crate::config::VipId;

/// Smallest-free-first id allocator for runtime changes. At start-up the ids come from the
/// previous run's maps instead (`restart`), so that a VIP or backend keeps its id and with
/// it its pinned connection-table entries and counters, and are claimed one by one.
pub(super) struct Ids {
    pub(super) used: BTreeSet<u32>,
    limit: u32,
    what: &'static str,
}

impl Ids {
    pub(super) fn new(limit: u32, what: &'static str) -> Self {
        Self {
            used: BTreeSet::new(),
            limit,
            what,
        }
    }

    pub(super) fn take(&mut self) -> Result<u32> {
        let id = (0..self.limit)
            .find(|i| !self.used.contains(i))
            .ok_or(ServiceError::Exhausted(self.what))?;
        self.used.insert(id);
        Ok(id)
    }

    /// Takes `id` itself (one a start-up planned).
    pub(super) fn claim(&mut self, id: u32) -> Result<()> {
        if id >= self.limit || !self.used.insert(id) {
            return Err(ServiceError::Invalid {
                what: format!("{} id {id}", self.what),
                message: "already in use or out of range".into(),
            });
        }
        Ok(())
    }

    pub(super) fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// 16-byte wire form of an address.
pub fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&v4.octets());
            out
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub(super) fn family(a: IpAddr) -> u8 {
    if a.is_ipv4() {
        AF_INET
    } else {
        AF_INET6
    }
}

pub(super) fn vip_key(id: &VipId) -> VipKey {
    VipKey {
        addr: addr16(id.address),
        port: id.port.to_be(),
        proto: id.protocol.ip_proto(),
        family: family(id.address),
        _pad: [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reuse_the_smallest_free() {
        let mut ids = Ids::new(3, "backend");
        assert_eq!((ids.take().unwrap(), ids.take().unwrap()), (0, 1));
        ids.release(0);
        assert_eq!(ids.take().unwrap(), 0);
        assert_eq!(ids.take().unwrap(), 2);
        assert!(matches!(
            ids.take(),
            Err(ServiceError::Exhausted("backend"))
        ));
    }

    #[test]
    fn claim_takes_a_free_id_only() {
        let mut ids = Ids::new(3, "VIP");
        ids.claim(2).unwrap();
        assert!(ids.claim(2).is_err());
        assert!(ids.claim(3).is_err());
        assert_eq!(ids.take().unwrap(), 0);
    }

    #[test]
    fn vip_key_is_in_wire_order() {
        let k = vip_key(&"10.1.2.3:80/udp".parse().unwrap());
        assert_eq!(&k.addr[..5], &[10, 1, 2, 3, 0]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!((k.proto, k.family), (common::IPPROTO_UDP, AF_INET));
        let k6 = vip_key(&"[2001:db8::1]:443/tcp".parse().unwrap());
        assert_eq!((k6.addr[0], k6.addr[15], k6.family), (0x20, 1, AF_INET6));
    }
}
