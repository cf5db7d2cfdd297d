//! Receiving PDUs, with P-DATA-TF taken apart in place.
//!
//! dicom-ul copies each P-DATA-TF PDU out of its read buffer and then each
//! presentation data value out of that copy into a fresh, zero-filled `Vec`:
//! two extra passes over every received byte, 11.5 % of the server's CPU per
//! CT slice in the ingest profile (benches/README.md). Here a complete
//! P-DATA-TF PDU is split off the association's own read buffer and its
//! values are slices of it, shared with the spool without a copy. Every
//! other PDU (release, abort, anything unexpected) is left in the buffer for
//! dicom-ul to read and parse as before.

use std::time::Duration;

use bytes::{Buf, Bytes};
use dicom_ul::Pdu;
use dicom_ul::association::AsyncAssociation;
use tokio::io::AsyncReadExt;

/// PDU type (1 byte), reserved (1), length (4).
const PDU_HEADER: usize = 6;
const P_DATA_TF: u8 = 0x04;

/// One presentation data value; its bytes share the received PDU's buffer.
#[derive(Debug)]
pub struct Pdv {
    pub context_id: u8,
    /// A command fragment (else a data set fragment).
    pub command: bool,
    pub last: bool,
    pub data: Bytes,
}

/// What arrived.
#[derive(Debug)]
pub enum Incoming {
    Data(Vec<Pdv>),
    Other(Pdu),
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("P-DATA-TF PDU of {length} bytes exceeds the negotiated maximum of {max}")]
    TooLarge { length: usize, max: usize },
    #[error("malformed P-DATA-TF PDU: {0}")]
    Malformed(&'static str),
    #[error("the peer closed the connection")]
    Closed,
    #[error("no data from the peer for {0:?}")]
    Timeout(Duration),
    #[error("cannot read from the peer: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Ul(#[from] dicom_ul::association::Error),
}

impl ReceiveError {
    /// The `reason` label of the failed-associations metric.
    pub fn label(&self) -> &'static str {
        match self {
            ReceiveError::TooLarge { .. } => "pdu_too_large",
            ReceiveError::Malformed(_) => "malformed_pdu",
            // Another PDU than P-DATA-TF that dicom-ul could not read
            // (malformed, cut off or a transport error).
            ReceiveError::Ul(_) => "unreadable_pdu",
            ReceiveError::Closed => "connection_closed",
            ReceiveError::Timeout(_) => "timeout",
            ReceiveError::Io(_) => "connection_error",
        }
    }
}

/// Read the next PDU. `max_pdu_length` is the maximum we announced (the
/// PDU's length field, header excluded, as PS3.8 §9.3.1 counts it).
/// `timeout` bounds the whole PDU, as dicom-ul's own receive does: a peer
/// trickling bytes cannot hold a buffer open past it.
pub async fn receive<S, A>(
    assoc: &mut A,
    max_pdu_length: u32,
    timeout: Duration,
) -> Result<Incoming, ReceiveError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    A: AsyncAssociation<S> + Send,
{
    let framed = tokio::time::timeout(timeout, next_p_data(assoc, max_pdu_length as usize))
        .await
        .map_err(|_| ReceiveError::Timeout(timeout))??;
    match framed {
        Some(values) => Ok(Incoming::Data(values)),
        None => Ok(Incoming::Other(AsyncAssociation::receive(assoc).await?)),
    }
}

/// The values of the next PDU if it is a P-DATA-TF; `None`, with nothing
/// consumed, if it is another PDU.
async fn next_p_data<S, A>(assoc: &mut A, max: usize) -> Result<Option<Vec<Pdv>>, ReceiveError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    A: AsyncAssociation<S> + Send,
{
    loop {
        let (socket, buffer) = assoc.get_mut();
        if buffer.len() >= PDU_HEADER {
            if buffer[0] != P_DATA_TF {
                return Ok(None);
            }
            let length = u32::from_be_bytes([buffer[2], buffer[3], buffer[4], buffer[5]]) as usize;
            if length > max {
                return Err(ReceiveError::TooLarge { length, max });
            }
            let whole = PDU_HEADER + length;
            if buffer.len() >= whole {
                let mut pdu = buffer.split_to(whole).freeze();
                pdu.advance(PDU_HEADER);
                return split_values(pdu).map(Some);
            }
            // Room for the rest of this PDU, so it arrives in few reads.
            buffer.reserve(whole - buffer.len());
        }
        if socket.read_buf(buffer).await? == 0 {
            return Err(ReceiveError::Closed);
        }
    }
}

/// The presentation data value items of a P-DATA-TF PDU's variable field
/// (PS3.8 §9.3.5.1), each a slice of it.
fn split_values(mut items: Bytes) -> Result<Vec<Pdv>, ReceiveError> {
    let mut values = Vec::with_capacity(1);
    while items.has_remaining() {
        if items.remaining() < 6 {
            return Err(ReceiveError::Malformed("truncated item header"));
        }
        let length = items.get_u32() as usize;
        if length < 2 {
            return Err(ReceiveError::Malformed("item shorter than its header"));
        }
        if length > items.remaining() {
            return Err(ReceiveError::Malformed("item longer than the PDU"));
        }
        let context_id = items.get_u8();
        let control = items.get_u8();
        values.push(Pdv {
            context_id,
            command: control & 0x01 != 0,
            last: control & 0x02 != 0,
            data: items.split_to(length - 2),
        });
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(context: u8, control: u8, data: &[u8]) -> Vec<u8> {
        let mut v = ((data.len() + 2) as u32).to_be_bytes().to_vec();
        v.extend([context, control]);
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn values_are_slices_of_the_pdu() {
        let mut body = item(1, 0x03, b"command");
        body.extend(item(3, 0x00, b"data set fragment"));
        body.extend(item(3, 0x02, b""));
        let pdu = Bytes::from(body);
        let values = split_values(pdu.clone()).unwrap();
        assert_eq!(values.len(), 3);
        assert!(values[0].command && values[0].last);
        assert_eq!(&values[0].data[..], b"command");
        assert_eq!(values[1].context_id, 3);
        assert!(!values[1].command && !values[1].last);
        assert_eq!(&values[1].data[..], b"data set fragment");
        assert!(values[2].last && values[2].data.is_empty());
        // No copy: the value points into the PDU's buffer.
        assert_eq!(values[1].data.as_ptr(), pdu[19..].as_ptr());
    }

    #[test]
    fn malformed_items_are_refused() {
        let short = Bytes::from_static(&[0, 0, 0, 1, 1, 0]);
        assert!(matches!(
            split_values(short),
            Err(ReceiveError::Malformed(_))
        ));
        let mut over = item(1, 0, b"abc");
        over[3] = 9; // claims 7 data bytes, has 3
        assert!(matches!(
            split_values(Bytes::from(over)),
            Err(ReceiveError::Malformed(_))
        ));
        let truncated = Bytes::from_static(&[0, 0, 0]);
        assert!(matches!(
            split_values(truncated),
            Err(ReceiveError::Malformed(_))
        ));
    }
}
