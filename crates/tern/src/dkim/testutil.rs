//! Test helpers: keys made once per test run, a config whose data folder
//! holds them, and a small DKIM verifier written from RFC 6376 §3.4/§3.7
//! (relaxed canonicalization only) that checks signatures against the DNS
//! text `KeyFile::dns_txt` publishes, independently of mail-auth's own
//! verifier. The Python suite checks the same with dkimpy.

use super::keys::{Algorithm, KeyFile};
use crate::config::{self, Runtime};
use aws_lc_rs::signature::{ED25519, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

/// RSA generation takes a moment: one key of each kind per test binary.
pub(crate) fn pem(algorithm: Algorithm) -> &'static str {
    static RSA: OnceLock<String> = OnceLock::new();
    static ED25519: OnceLock<String> = OnceLock::new();
    let cell = match algorithm {
        Algorithm::RsaSha256 => &RSA,
        Algorithm::Ed25519Sha256 => &ED25519,
    };
    cell.get_or_init(|| KeyFile::generate(algorithm).expect("key generation").1)
}

/// A config with data folder `data_dir`, local domains example.test and
/// other.test, `extra` appended (TOML), and each `(domain, selector, pem)`
/// written as `<data_dir>/dkim/<domain>/<selector>.key`.
pub(crate) fn runtime_with_keys(
    data_dir: &Path,
    keys: &[(&str, &str, &str)],
    extra: &str,
) -> Result<Runtime, Vec<config::ConfigError>> {
    for (domain, selector, pem) in keys {
        let path = super::key_path(&data_dir.join("dkim"), domain, selector);
        std::fs::create_dir_all(path.parent().expect("key folder")).expect("mkdir");
        std::fs::write(&path, pem).expect("write key");
    }
    let text = format!(
        "hostname = \"mx.example.test\"\ndata_dir = {:?}\n[local]\ndomains = [\"example.test\", \"other.test\"]\n{extra}",
        data_dir.display().to_string()
    );
    config::parse(&text, data_dir)
}

/// The TXT record of `pem`, as `tern dkim generate` publishes it.
pub(crate) fn txt_of(pem: &str) -> String {
    KeyFile::from_pem(pem.as_bytes())
        .and_then(|k| k.dns_txt())
        .expect("public key")
}

/// Splits a CRLF message into its raw header fields (each with its CRLF
/// and folding) and its body.
pub(crate) fn split(message: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut fields = Vec::new();
    let mut pos = 0;
    loop {
        let rest = &message[pos..];
        if rest.starts_with(b"\r\n") || rest.is_empty() {
            let body_start = (pos + 2).min(message.len());
            return (fields, &message[body_start..]);
        }
        let mut end = 0;
        loop {
            match find(&rest[end..], b"\r\n") {
                Some(i) => {
                    end += i + 2;
                    if !matches!(rest.get(end), Some(b' ' | b'\t')) {
                        break;
                    }
                }
                None => {
                    end = rest.len();
                    break;
                }
            }
        }
        fields.push(&rest[..end]);
        pos += end;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn is_wsp(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// Runs of white space to one space, after removing line breaks.
fn compress(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len());
    let mut in_space = false;
    for &b in value.iter().filter(|&&b| b != b'\r' && b != b'\n') {
        if is_wsp(b) {
            in_space = true;
        } else {
            if in_space && !out.is_empty() {
                out.push(b' ');
            }
            in_space = false;
            out.push(b);
        }
    }
    out
}

pub(crate) fn field_name(field: &[u8]) -> String {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(field.len());
    String::from_utf8_lossy(&field[..colon])
        .trim()
        .to_ascii_lowercase()
}

/// RFC 6376 §3.4.2, with the CRLF.
fn relaxed_field(field: &[u8]) -> Vec<u8> {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(field.len());
    let mut out = field_name(field).into_bytes();
    out.push(b':');
    out.extend(compress(field.get(colon + 1..).unwrap_or_default()));
    out.extend_from_slice(b"\r\n");
    out
}

/// RFC 6376 §3.4.4.
pub(crate) fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (line, next) = match find(rest, b"\r\n") {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (rest, &b""[..]),
        };
        let mut l = Vec::new();
        let mut in_space = false;
        for &b in line {
            if is_wsp(b) {
                in_space = true;
            } else {
                if in_space {
                    l.push(b' ');
                }
                in_space = false;
                l.push(b);
            }
        }
        lines.push(l);
        rest = next;
    }
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut out = Vec::new();
    for l in lines {
        out.extend(l);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The tags of a DKIM-Signature or key record, white space removed from
/// the values.
pub(crate) fn tags(value: &[u8]) -> HashMap<String, String> {
    String::from_utf8_lossy(value)
        .split(';')
        .filter_map(|tag| {
            let (name, value) = tag.split_once('=')?;
            Some((
                name.trim().to_string(),
                value.chars().filter(|c| !c.is_whitespace()).collect(),
            ))
        })
        .collect()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

fn b64(text: &str) -> Vec<u8> {
    mail_parser::decoders::base64::base64_decode(text.as_bytes()).expect("base64")
}

/// Verifies the `index`-th DKIM-Signature field of `message` (0: topmost)
/// with the key record `dns[selector]`.
pub(crate) fn verify(
    message: &[u8],
    index: usize,
    dns: &HashMap<String, String>,
) -> Result<(), String> {
    let (fields, body) = split(message);
    let signature_field = *fields
        .iter()
        .filter(|f| field_name(f) == "dkim-signature")
        .nth(index)
        .ok_or("no such DKIM-Signature")?;
    let colon = signature_field
        .iter()
        .position(|&b| b == b':')
        .ok_or("no colon")?;
    let t = tags(&signature_field[colon + 1..]);
    if t.get("c").map(String::as_str) != Some("relaxed/relaxed") {
        return Err(format!("c={:?}", t.get("c")));
    }
    if b64(&t["bh"]) != sha256(&relaxed_body(body)) {
        return Err("body hash mismatch".into());
    }
    // The fields named by h=, each instance taken from the bottom up.
    let mut used = vec![false; fields.len()];
    let mut signed = Vec::new();
    for name in t["h"].split(':') {
        let name = name.to_ascii_lowercase();
        if let Some(i) = (0..fields.len())
            .rev()
            .find(|&i| !used[i] && field_name(fields[i]) == name)
        {
            used[i] = true;
            signed.extend(relaxed_field(fields[i]));
        }
    }
    // The signature field itself with an empty b= and no CRLF.
    let text = String::from_utf8_lossy(signature_field);
    let emptied: Vec<String> = text
        .split(';')
        .map(|tag| match tag.split_once('=') {
            Some((name, _)) if name.trim() == "b" => format!("{name}="),
            _ => tag.to_string(),
        })
        .collect();
    let mut own = relaxed_field(emptied.join(";").as_bytes());
    own.truncate(own.len() - 2);
    signed.extend(own);

    let record = dns
        .get(&t["s"])
        .ok_or_else(|| format!("no key record for selector {}", t["s"]))?;
    let public = b64(&tags(record.as_bytes())["p"]);
    let signature = b64(&t["b"]);
    let checked = match t["a"].as_str() {
        "rsa-sha256" => {
            UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public).verify(&signed, &signature)
        }
        "ed25519-sha256" => {
            UnparsedPublicKey::new(&ED25519, &public).verify(&sha256(&signed), &signature)
        }
        other => return Err(format!("a={other}")),
    };
    checked.map_err(|_| "signature does not verify".to_string())
}
