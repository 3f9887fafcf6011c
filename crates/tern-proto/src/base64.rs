//! Standard base64 with padding (RFC 4648 §4), as SMTP AUTH uses it
//! (RFC 4954 §4): the client encodes its credentials with it, the server
//! its challenges, and the server decodes the client's responses.
//!
//! Invariants: `decode(&encode(x)) == Some(x)` for any octets; `decode`
//! accepts only the canonical alphabet with `=` padding to a multiple of
//! four characters (no line breaks, no blanks, no URL-safe alphabet), so
//! there is exactly one way to read a response.
//!
//! Not done: checking that the unused bits of the last group are zero
//! (RFC 4648 §3.5 lets a decoder reject them; clients that leave them set
//! still mean one value, so it is accepted).
//!
//! Errors: `decode` returns `None` for anything malformed.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes octets.
pub fn encode(input: &[u8]) -> String {
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for k in 0..4 {
            if k <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * k) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The value of one alphabet character.
fn value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes padded base64; `None` when malformed. The empty string is the
/// empty value.
pub fn decode(input: &[u8]) -> Option<Vec<u8>> {
    if !input.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let groups = input.len() / 4;
    for (i, group) in input.chunks(4).enumerate() {
        // Padding only at the very end: `x===` and `xy=z` are malformed.
        let pad = match group {
            [_, _, b'=', b'='] => 2,
            [_, _, _, b'='] => 1,
            _ => 0,
        };
        if pad > 0 && i + 1 != groups {
            return None;
        }
        let mut n = 0u32;
        for &c in &group[..4 - pad] {
            n = n << 6 | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VECTORS: [(&str, &str); 7] = [
        // RFC 4648 §10.
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ];

    #[test]
    fn rfc_4648_vectors() {
        for (i, o) in VECTORS {
            assert_eq!(encode(i.as_bytes()), o);
            assert_eq!(decode(o.as_bytes()).as_deref(), Some(i.as_bytes()), "{o}");
        }
    }

    #[test]
    fn malformed_is_refused() {
        for bad in [
            "Zg", "Zg=", "Z===", "====", "Zg==Zg==", "Zm9v\r\n", "Zm 9v", "Zm9v=", "Zm-_", "=Zm9",
            "Zm=v", "*",
        ] {
            assert_eq!(decode(bad.as_bytes()), None, "{bad}");
        }
        // Unused bits set: still one value.
        assert_eq!(decode(b"Zh=="), Some(b"f".to_vec()));
    }

    proptest! {
        #[test]
        fn round_trip(input in prop::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(decode(encode(&input).as_bytes()), Some(input));
        }
    }
}
