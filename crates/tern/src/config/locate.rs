//! Every error of a config file in one run, each with its line.
//!
//! serde stops at the first problem (a TOML syntax error, an unknown key, a
//! value of the wrong type), and an administrator fixing a file one error
//! per run is an administrator who gives up. So the file is read again and
//! again: after each error the lines it is about are blanked (spaces, so
//! every later byte keeps its offset and line) and the rest is read once
//! more, until it parses. Validation then runs on what is left, and its
//! errors, which name keys rather than bytes, are placed by finding the key.

use super::ConfigError;
use super::schema::FileConfig;

/// More than this many errors in one file are not worth reading one by
/// one; the bound also ends a cascade the blanking might start.
const MAX_SYNTAX_ERRORS: usize = 50;

/// The file as far as it parses, and the errors met on the way there (each
/// with its key and line). `None` when nothing usable is left.
pub(super) fn deserialize_all(text: &str) -> (Option<FileConfig>, Vec<ConfigError>) {
    let mut work = text.to_string();
    let mut errors = Vec::new();
    let mut last_span = None;
    for _ in 0..MAX_SYNTAX_ERRORS {
        let e = match toml::from_str::<FileConfig>(&work) {
            Ok(file) => return (Some(file), errors),
            Err(e) => e,
        };
        errors.push(super::toml_error(&work, &e));
        let span = e.span();
        // An error without a place, or at a place already blanked, cannot be
        // stepped over.
        let Some(span) = span else {
            return (None, errors);
        };
        if last_span == Some(span.clone()) || !blank(&mut work, span.clone()) {
            return (None, errors);
        }
        last_span = Some(span);
    }
    (None, errors)
}

/// 1-based line of byte `offset`.
pub(super) fn line_at(text: &str, offset: usize) -> usize {
    let offset = floor_char_boundary(text, offset.min(text.len()));
    text[..offset].matches('\n').count() + 1
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// Blanks the whole lines `span` touches; an error on a table header
/// blanks the table (header and keys: its keys alone would land in the
/// table above and each be reported as unknown there). Whether anything
/// changed.
fn blank(text: &mut String, span: std::ops::Range<usize>) -> bool {
    let start = floor_char_boundary(text, span.start.min(text.len()));
    let end = floor_char_boundary(text, span.end.max(span.start).min(text.len()));
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let mut line_end = text[end..].find('\n').map_or(text.len(), |i| end + i);
    if text[line_start..].trim_start().starts_with('[') {
        // To the next header, or the end of the file.
        let mut next = line_end;
        while next < text.len() {
            let after = next + 1;
            let this_end = text[after..].find('\n').map_or(text.len(), |i| after + i);
            if text[after..this_end].trim_start().starts_with('[') {
                break;
            }
            next = this_end;
        }
        line_end = next;
    }
    let blanked: String = text[line_start..line_end]
        .chars()
        .map(|c| {
            if c == '\n' {
                "\n".to_string()
            } else {
                " ".repeat(c.len_utf8())
            }
        })
        .collect();
    let changed = blanked != text[line_start..line_end];
    text.replace_range(line_start..line_end, &blanked);
    changed
}

/// The line where `key` (as validation names it: `limits.max_errors`,
/// `user[1].addresses[0]`, `aliases."sales@example.org"`) is set, or
/// failing that the line of the nearest enclosing table or key.
pub(super) fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let want = key_path(key);
    if want.is_empty() {
        return None;
    }
    let mut table: Vec<String> = Vec::new();
    let mut array_counts: std::collections::HashMap<Vec<String>, usize> = Default::default();
    let mut best: Option<(usize, usize)> = None; // (matched segments, line)
    let consider = |path: &[String], line: usize, best: &mut Option<(usize, usize)>| {
        let n = common_prefix(path, &want);
        // Only a path that is wholly part of the wanted one locates it.
        if n == path.len() && n > 0 && best.is_none_or(|(m, _)| n > m) {
            *best = Some((n, line));
        }
    };
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.starts_with("[[") {
            let inner = trimmed.trim_start_matches('[');
            let inner = inner.split("]]").next().unwrap_or("");
            let path = key_segments(inner);
            let n = array_counts.entry(path.clone()).or_insert(0);
            let mut indexed = path;
            indexed.push(n.to_string());
            *n += 1;
            table = indexed;
            consider(&table, line, &mut best);
        } else if let Some(inner) = trimmed.strip_prefix('[') {
            let inner = inner.split(']').next().unwrap_or("");
            table = key_segments(inner);
            consider(&table, line, &mut best);
        } else if let Some(eq) = unquoted_eq(trimmed) {
            let mut path = table.clone();
            path.extend(key_segments(&trimmed[..eq]));
            consider(&path, line, &mut best);
        }
    }
    best.map(|(_, line)| line)
}

fn common_prefix(a: &[String], b: &[String]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// `user[1].addresses[0]` → `user`, `1`, `addresses`, `0`; quoted
/// segments lose their quotes.
fn key_path(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in split_dotted(key) {
        let mut rest = part.as_str();
        // Indices after a name: `name[1][2]`.
        let name_end = if let Some(quoted) = rest.strip_prefix('"') {
            quoted.find('"').map_or(rest.len(), |i| i + 2)
        } else {
            rest.find('[').unwrap_or(rest.len())
        };
        out.push(unquote(&rest[..name_end]));
        rest = &rest[name_end..];
        while let Some(open) = rest.strip_prefix('[') {
            let close = open.find(']').unwrap_or(open.len());
            out.push(open[..close].trim().to_string());
            rest = open.get(close + 1..).unwrap_or("");
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A TOML key (`a.b`, `"x.y".z`, `a . b`) as its segments.
fn key_segments(key: &str) -> Vec<String> {
    split_dotted(key).iter().map(|s| unquote(s)).collect()
}

/// Splits on dots outside quotes.
fn split_dotted(key: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut quote = None;
    for c in key.chars() {
        match (quote, c) {
            (None, '.') => parts.push(std::mem::take(&mut part)),
            (None, '"' | '\'') => {
                quote = Some(c);
                part.push(c);
            }
            (Some(q), _) if c == q => {
                quote = None;
                part.push(c);
            }
            _ => part.push(c),
        }
    }
    parts.push(part);
    parts.iter().map(|p| p.trim().to_string()).collect()
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    for q in ['"', '\''] {
        if s.len() >= 2 && s.starts_with(q) && s.ends_with(q) {
            return s[1..s.len() - 1].to_string();
        }
    }
    s.to_string()
}

/// The offset of the `=` of a `key = value` line, outside quotes.
fn unquoted_eq(line: &str) -> Option<usize> {
    if line.starts_with('#') {
        return None;
    }
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (None, '=') => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_syntax_type_and_unknown_key_error_is_reported_with_its_line() {
        let text = "hostname = \"mx.example.org\"\n\
                    [limits]\n\
                    max_errors = \"many\"\n\
                    bogus_key = 1\n\
                    max_recipients = 100\n\
                    [spool]\n\
                    segment_size = = 3\n\
                    [delivery]\n\
                    batch_size = -1\n";
        let (file, errors) = deserialize_all(text);
        let found: Vec<(Option<usize>, &str)> =
            errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(found.contains(&(Some(3), "limits.max_errors")), "{found:?}");
        assert!(found.iter().any(|(l, _)| *l == Some(4)), "{found:?}");
        assert!(found.iter().any(|(l, _)| *l == Some(7)), "{found:?}");
        assert!(
            found.contains(&(Some(9), "delivery.batch_size")),
            "{found:?}"
        );
        let file = file.expect("what is left parses");
        assert_eq!(file.limits.max_recipients, 100);
        assert_eq!(file.hostname.as_deref(), Some("mx.example.org"));
    }

    #[test]
    fn a_broken_table_header_is_stepped_over_with_its_keys() {
        let text = "[limits\nmax_errors = 3\n[spool]\nbogus = 1\n";
        let (_, errors) = deserialize_all(text);
        let lines: Vec<_> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![Some(1), Some(4)], "{errors:?}");
    }

    #[test]
    fn a_clean_file_has_no_errors() {
        let (file, errors) = deserialize_all("[limits]\nmax_errors = 3\n");
        assert!(errors.is_empty());
        assert_eq!(file.map(|f| f.limits.max_errors), Some(3));
    }

    #[test]
    fn keys_from_validation_are_found() {
        let text = "hostname = \"x\"\n\
                    [[user]]\nname = \"a\"\n\
                    [[user]]\nname = \"b\"\naddresses = [\n  \"b@x\",\n]\n\
                    [aliases]\n\"sales@x\" = [\"a\"]\n\
                    [limits]\nmax_errors = 3\n";
        assert_eq!(line_of_key(text, "hostname"), Some(1));
        assert_eq!(line_of_key(text, "user[1].name"), Some(5));
        assert_eq!(line_of_key(text, "user[1].addresses[0]"), Some(6));
        assert_eq!(line_of_key(text, "user[0]"), Some(2));
        assert_eq!(line_of_key(text, "aliases.\"sales@x\""), Some(10));
        assert_eq!(line_of_key(text, "limits.max_errors"), Some(12));
        // Not in the file (a default): the table it belongs to.
        assert_eq!(line_of_key(text, "limits.max_recipients"), Some(11));
        assert_eq!(line_of_key(text, "spool.dir"), None);
    }
}
