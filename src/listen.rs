//! What the DICOM and HTTPS accept loops share: taking the next connection
//! (retrying a failed accept, TCP_NODELAY set), and counting connections per
//! peer address (in a TLS handshake; DICOM associations), so that one
//! address holding many connections cannot take every place from the others.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The next connection on `listener`, with TCP_NODELAY set (Nagle plus
/// delayed ACK stalls each small answer by ~40 ms); `None` once `shutdown`
/// fires. A failed accept (out of file descriptors, say) is retried after a
/// moment: at once would spin.
pub async fn next_connection(
    listener: &TcpListener,
    shutdown: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((socket, peer)) => {
                    let _ = socket.set_nodelay(true);
                    return Some((socket, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            () = shutdown.cancelled() => return None,
        }
    }
}

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

    /// A place for `ip` (an IPv4-mapped address counted as its IPv4
    /// address), or `None` when it holds `max` already.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<PeerPlace> {
        let ip = canonical(ip);
        let mut counts = self.counts();
        let n = counts.entry(ip).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PeerPlace(self.clone(), ip))
    }

    /// The counts. Nothing panics while holding them, and a count stays
    /// right if something ever did: the accept loops and Drop must not panic.
    fn counts(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Places `ip` holds now.
    #[cfg(test)]
    pub fn held(&self, ip: IpAddr) -> usize {
        self.counts().get(&canonical(ip)).copied().unwrap_or(0)
    }
}

/// An IPv4 peer may arrive as an IPv4-mapped IPv6 address: one peer, one key.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut counts = self.0.counts();
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
