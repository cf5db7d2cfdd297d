//! A loopback TCP relay that records every data set a peer sends, as it
//! crossed the wire (P-DATA-TF data PDVs reassembled, PS3.8 §9.3.5), so a
//! test can compare stored bytes with what was really sent.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct WireTap {
    pub port: u16,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl WireTap {
    /// Relay 127.0.0.1:<port> to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let captured = Arc::new(Mutex::new(Vec::new()));
        let sink = captured.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    });
                    let mut parser = PduParser::default();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        for ds in parser.feed(&buf[..n]) {
                            sink.lock().unwrap().push(ds);
                        }
                    }
                    let _ = sw.shutdown().await;
                });
            }
        });
        Self { port, captured }
    }

    /// Every complete data set seen so far.
    pub fn datasets(&self) -> Vec<Vec<u8>> {
        self.captured.lock().unwrap().clone()
    }
}

#[derive(Default)]
struct PduParser {
    pending: Vec<u8>,
    dataset: Vec<u8>,
}

impl PduParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(bytes);
        let mut done = Vec::new();
        loop {
            if self.pending.len() < 6 {
                break;
            }
            let len = u32::from_be_bytes(self.pending[2..6].try_into().unwrap()) as usize;
            if self.pending.len() < 6 + len {
                break;
            }
            let pdu: Vec<u8> = self.pending.drain(..6 + len).collect();
            if pdu[0] != 0x04 {
                continue;
            }
            let mut items = &pdu[6..];
            while items.len() >= 6 {
                let ilen = u32::from_be_bytes(items[..4].try_into().unwrap()) as usize;
                let ctrl = items[5];
                let data = &items[6..4 + ilen];
                if ctrl & 0x01 == 0 {
                    self.dataset.extend_from_slice(data);
                    if ctrl & 0x02 != 0 {
                        done.push(std::mem::take(&mut self.dataset));
                    }
                }
                items = &items[4 + ilen..];
            }
        }
        done
    }
}
