//! What the DICOM and HTTPS accept loops share: taking the next connection
//! (retrying a failed accept, TCP_NODELAY set), and counting connections in
//! a phase (a TLS handshake) per peer address, so that one address holding
//! many half-open connections cannot take every place from the others.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

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
