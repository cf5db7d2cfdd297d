//! How many associations run at once: in all (`server.max_associations`),
//! and from one peer address (`server.max_associations_per_peer`), so that
//! one sender opening many associations cannot take every slot from the
//! other hospitals' modalities.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::listen::{PeerPlace, PerPeer};

/// The slots both listeners (plain and TLS) take from.
pub struct Slots {
    all: Arc<Semaphore>,
    max: usize,
    per_peer: Option<Arc<PerPeer>>,
}

/// One association's place; given back when dropped.
pub struct Slot {
    _all: OwnedSemaphorePermit,
    _peer: Option<PeerPlace>,
}

/// Which limit refused an association.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    All,
    Peer,
}

impl Full {
    /// The `reason` label of the rejected-associations metric.
    pub fn reason(self) -> &'static str {
        match self {
            Full::All => "limit",
            Full::Peer => "peer_limit",
        }
    }
}

impl Slots {
    pub fn new(max: usize, per_peer: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            all: Arc::new(Semaphore::new(max)),
            max,
            per_peer: per_peer.map(PerPeer::new),
        })
    }

    /// The limit on all associations.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for an association from `peer`, if both limits allow one (a
    /// refusal for the whole gives the peer's place back as it drops).
    pub fn take(&self, peer: IpAddr) -> Result<Slot, Full> {
        let place = match &self.per_peer {
            Some(per_peer) => Some(per_peer.enter(peer).ok_or(Full::Peer)?),
            None => None,
        };
        let all = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| Full::All)?;
        Ok(Slot {
            _all: all,
            _peer: place,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_has_its_share_and_all_share_the_whole() {
        let slots = Slots::new(3, Some(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(mapped).unwrap();
        assert_eq!(
            slots.take(a).err(),
            Some(Full::Peer),
            "the same peer, mapped"
        );
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(b).err(), Some(Full::All));
        drop(a1);
        // The refusal for the whole did not keep b's count up.
        let _b2 = slots.take(b).unwrap();
        assert_eq!(slots.take(a).err(), Some(Full::All));
        assert_eq!(slots.per_peer.as_ref().unwrap().held(a), 1);
    }

    #[test]
    fn without_a_per_peer_limit_only_the_whole_counts() {
        let slots = Slots::new(2, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let _first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Full::All));
        assert!(slots.per_peer.is_none());
    }
}
