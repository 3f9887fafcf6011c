//! Versioned record encoding: segment header, record header, CRC32C trailer,
//! and the MSG / STATE / DONE payloads. The byte layout is documented in the
//! `spool` module header (format version 1).
//!
//! Invariants: `parse_record` accepts a record only if magic, version, kind,
//! flags, length and CRC all check out, and never reads past the slice.
//! Does not do I/O.
//! Errors: decoding failures are `String`s describing the damage; callers turn
//! them into `SpoolError::Corrupt` or treat the record as a bad region.

use super::{Envelope, MsgId, RcptStatus};

pub(crate) const SEG_MAGIC: &[u8; 8] = b"TERNSPOL";
pub(crate) const FORMAT_VERSION: u32 = 1;
pub(crate) const SEG_HDR_LEN: u64 = 24;

pub(crate) const REC_MAGIC: &[u8; 4] = b"TREC";
pub(crate) const REC_VERSION: u8 = 1;
pub(crate) const REC_HDR_LEN: usize = 12;
pub(crate) const REC_OVERHEAD: usize = REC_HDR_LEN + 4;

/// Record kinds (the `kind` byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Msg = 1,
    State = 2,
    Done = 3,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Msg),
            2 => Some(Kind::State),
            3 => Some(Kind::Done),
            _ => None,
        }
    }
}

pub(crate) fn segment_header(nonce: u64) -> [u8; SEG_HDR_LEN as usize] {
    let mut h = [0u8; SEG_HDR_LEN as usize];
    h[..8].copy_from_slice(SEG_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&nonce.to_le_bytes());
    let crc = crc32c::crc32c(&h[..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The segment nonce, or `None` if the header is short, damaged or not ours.
/// The header has its own CRC so that a damaged nonce is never mistaken for
/// a torn tail (which would cut every record of the segment).
pub(crate) fn parse_segment_header(buf: &[u8]) -> Option<u64> {
    if buf.len() < SEG_HDR_LEN as usize || &buf[..8] != SEG_MAGIC {
        return None;
    }
    if buf[8..12] != FORMAT_VERSION.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(buf[20..24].try_into().ok()?);
    if crc32c::crc32c(&buf[..20]) != crc {
        return None;
    }
    Some(u64::from_le_bytes(buf[12..20].try_into().ok()?))
}

pub(crate) fn record_header(kind: Kind, payload_len: u32) -> [u8; REC_HDR_LEN] {
    let mut h = [0u8; REC_HDR_LEN];
    h[..4].copy_from_slice(REC_MAGIC);
    h[4] = REC_VERSION;
    h[5] = kind as u8;
    h[8..12].copy_from_slice(&payload_len.to_le_bytes());
    h
}

/// CRC state after the nonce: every record CRC starts here.
pub(crate) fn crc_seed(nonce: u64) -> u32 {
    crc32c::crc32c(&nonce.to_le_bytes())
}

/// A complete, CRC-checked record found at the start of a slice.
pub(crate) struct Parsed<'a> {
    pub kind: Kind,
    pub payload: &'a [u8],
    /// Header + payload + CRC.
    pub total: usize,
}

/// Parse the record at the start of `buf` (which may run to end of file).
pub(crate) fn parse_record(buf: &[u8], nonce: u64) -> Option<Parsed<'_>> {
    if buf.len() < REC_OVERHEAD || &buf[..4] != REC_MAGIC || buf[4] != REC_VERSION {
        return None;
    }
    let kind = Kind::from_u8(buf[5])?;
    if buf[6] != 0 || buf[7] != 0 {
        return None;
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().ok()?) as usize;
    let total = REC_OVERHEAD.checked_add(len)?;
    if total > buf.len() {
        return None;
    }
    let body_end = REC_HDR_LEN + len;
    let want = u32::from_le_bytes(buf[body_end..total].try_into().ok()?);
    if crc32c::crc32c_append(crc_seed(nonce), &buf[..body_end]) != want {
        return None;
    }
    Some(Parsed {
        kind,
        payload: &buf[REC_HDR_LEN..body_end],
        total,
    })
}

/// Offset of the next record start at or after `from` and before `limit`
/// that parses, if any. Used to resynchronise after a damaged region;
/// `limit` is the start of a segment's trailing zeros, where no record can
/// start (a record begins with the non-zero magic), so a preallocated
/// segment's empty space is not searched.
pub(crate) fn resync(buf: &[u8], from: usize, limit: usize, nonce: u64) -> Option<usize> {
    let mut pos = from;
    let limit = limit.min(buf.len());
    while pos < limit && pos + REC_OVERHEAD <= buf.len() {
        let window_end = (limit + REC_MAGIC.len() - 1).min(buf.len());
        let hit = buf[pos..window_end]
            .windows(4)
            .position(|w| w == REC_MAGIC)?;
        let at = pos + hit;
        if parse_record(&buf[at..], nonce).is_some() {
            return Some(at);
        }
        pos = at + 1;
    }
    None
}

/// Encode a whole record in one buffer (tests craft segments with it).
#[cfg(test)]
pub(crate) fn encode(kind: Kind, payload: &[u8], nonce: u64) -> Result<Vec<u8>, String> {
    let len = u32::try_from(payload.len()).map_err(|_| "record too large".to_string())?;
    let hdr = record_header(kind, len);
    let mut out = Vec::with_capacity(REC_OVERHEAD + payload.len());
    out.extend_from_slice(&hdr);
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c_append(crc_seed(nonce), &out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Offset just past the last non-zero byte of `buf` (0 if all zero): where
/// the trailing zeros of a preallocated segment begin. Checks 64-byte blocks
/// first so scanning 64 MiB of zeros stays fast.
pub(crate) fn data_end(buf: &[u8]) -> usize {
    let mut end = buf.len();
    for chunk in buf.rchunks(64) {
        if let Some(i) = chunk.iter().rposition(|&b| b != 0) {
            return end - chunk.len() + i + 1;
        }
        end -= chunk.len();
    }
    0
}

/// MSG payload prefix: id, envelope JSON length, envelope JSON (the body follows).
pub(crate) fn msg_head(id: MsgId, env: &Envelope) -> Result<Vec<u8>, String> {
    let json = serde_json::to_vec(env).map_err(|e| format!("envelope encode: {e}"))?;
    let jlen = u32::try_from(json.len()).map_err(|_| "envelope too large".to_string())?;
    let mut out = Vec::with_capacity(12 + json.len());
    out.extend_from_slice(&id.0.to_le_bytes());
    out.extend_from_slice(&jlen.to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

fn read_id(payload: &[u8]) -> Result<MsgId, String> {
    let b: [u8; 8] = payload
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or("payload shorter than an id")?;
    Ok(MsgId(u64::from_le_bytes(b)))
}

/// Decode a MSG payload: id, envelope, and where the body starts in the payload.
pub(crate) fn decode_msg(payload: &[u8]) -> Result<(MsgId, Envelope, usize), String> {
    let id = read_id(payload)?;
    let jlen: [u8; 4] = payload
        .get(8..12)
        .and_then(|s| s.try_into().ok())
        .ok_or("MSG payload too short")?;
    let jend = 12usize
        .checked_add(u32::from_le_bytes(jlen) as usize)
        .filter(|&e| e <= payload.len())
        .ok_or("MSG envelope length out of range")?;
    let env: Envelope =
        serde_json::from_slice(&payload[12..jend]).map_err(|e| format!("envelope JSON: {e}"))?;
    Ok((id, env, jend))
}

pub(crate) fn state_payload(id: MsgId, changes: &[(usize, RcptStatus)]) -> Result<Vec<u8>, String> {
    let mut out = id.0.to_le_bytes().to_vec();
    serde_json::to_writer(&mut out, changes).map_err(|e| format!("state encode: {e}"))?;
    Ok(out)
}

pub(crate) fn decode_state(payload: &[u8]) -> Result<(MsgId, Vec<(usize, RcptStatus)>), String> {
    let id = read_id(payload)?;
    let changes = serde_json::from_slice(&payload[8..]).map_err(|e| format!("state JSON: {e}"))?;
    Ok((id, changes))
}

pub(crate) fn decode_done(payload: &[u8]) -> Result<MsgId, String> {
    if payload.len() != 8 {
        return Err("DONE payload must be 8 bytes".into());
    }
    read_id(payload)
}
