//! Connections in a phase (a TLS handshake, an association's negotiation)
//! counted per peer address: one address holding many half-open
//! connections must not take every place from the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The count of each address, and the most one address may hold.
#[derive(Debug)]
pub struct PerPeer {
    counts: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

/// One connection of an address in the phase (counted until dropped).
#[derive(Debug)]
pub struct PeerPlace(Arc<PerPeer>, IpAddr);

impl PerPeer {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A place for `ip`, or `None` when it holds `max` already.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PeerPlace> {
        let mut counts = self.counts.lock().expect("peer counts");
        let n = counts.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerPlace(self.clone(), ip))
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut counts = self.0.counts.lock().expect("peer counts");
        if let Some(n) = counts.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_per_address_and_come_back() {
        let peers = PerPeer::new(2);
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = peers.enter(a).unwrap();
        let _second = peers.enter(a).unwrap();
        assert!(peers.enter(a).is_none(), "a third from one address");
        assert!(peers.enter(b).is_some(), "another address is not held up");
        drop(first);
        assert!(peers.enter(a).is_some(), "a place comes back when dropped");
    }
}
