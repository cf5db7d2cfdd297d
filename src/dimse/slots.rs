//! How many associations run at once: in all (`server.max_associations`),
//! and from one peer address (`server.max_associations_per_peer`), so that
//! one sender opening many associations cannot take every slot from the
//! other hospitals' modalities.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots both listeners (plain and TLS) take from.
pub struct Slots {
    all: Arc<Semaphore>,
    max: usize,
    per_peer: Option<usize>,
    /// Associations running per peer address (only with a per-peer limit).
    peers: Mutex<HashMap<IpAddr, usize>>,
}

/// One association's place; given back when dropped.
pub struct Slot {
    _all: OwnedSemaphorePermit,
    peer: Option<(Arc<Slots>, IpAddr)>,
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
            per_peer,
            peers: Mutex::new(HashMap::new()),
        })
    }

    /// The limit on all associations.
    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for an association from `peer`, if both limits allow one.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Result<Slot, Full> {
        let peer = canonical(peer);
        let counted = match self.per_peer {
            None => None,
            Some(limit) => {
                let mut peers = self.counts();
                let running = peers.entry(peer).or_insert(0);
                if *running >= limit {
                    return Err(Full::Peer);
                }
                *running += 1;
                Some((self.clone(), peer))
            }
        };
        match self.all.clone().try_acquire_owned() {
            Ok(all) => Ok(Slot {
                _all: all,
                peer: counted,
            }),
            Err(_) => {
                if counted.is_some() {
                    self.give_back(peer);
                }
                Err(Full::All)
            }
        }
    }

    /// The counts; nothing panics while holding them, and a count is still
    /// right if something ever did (the accept loop and Drop must not panic).
    fn counts(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self, peer: IpAddr) {
        let mut peers = self.counts();
        if let Some(running) = peers.get_mut(&peer) {
            *running -= 1;
            if *running == 0 {
                peers.remove(&peer);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some((slots, peer)) = self.peer.take() {
            slots.give_back(peer);
        }
    }
}

/// An IPv4 peer may arrive as an IPv4-mapped IPv6 address: one peer, one key.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
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
        assert_eq!(slots.peers.lock().unwrap()[&a], 1);
    }

    #[test]
    fn without_a_per_peer_limit_only_the_whole_counts() {
        let slots = Slots::new(2, None);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let _first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Full::All));
        assert!(slots.peers.lock().unwrap().is_empty());
    }
}
