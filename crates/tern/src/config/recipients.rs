//! Recipient resolution: which mailboxes (and forwarding addresses) one
//! envelope recipient stands for.
//!
//! Order of lookup for an address in a local domain, after lower-casing it:
//! alias, then a user's address, then the same two without the subaddress
//! (`user+tag@` → `user@`), then `postmaster` (RFC 5321 §4.5.1: must always be
//! deliverable), then the domain's catch-all. Aliases expand recursively (at
//! most [`MAX_ALIAS_DEPTH`] levels); an alias that names its own address while
//! that address is also a user's delivers to that user (the usual
//! "keep a copy" idiom), any other cycle is cut.
//!
//! The address of a local copy (its `Delivered-To:`, as Postfix writes it)
//! is the address that reached the mailbox after alias expansion: the
//! recipient as the client gave it when it is the user's own address, with
//! its `+tag` and the case of its local part (the domain lower-cased);
//! an alias's target address as the alias names it; and for a target that
//! is a bare user name (also `postmaster` and a catch-all), that name at the
//! domain being expanded, as Postfix qualifies a bare name with
//! `$myorigin` (a host of several domains has one origin per domain).
//!
//! Not here: relay permission (the session decides with the client's address)
//! and the duplicate collapse across recipients of one message (the session
//! merges destinations per message).

use super::Runtime;
use std::collections::HashSet;

pub(super) const MAX_ALIAS_DEPTH: usize = 10;

/// Where one copy of the message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// The address this copy is for: for a local mailbox the address that
    /// reached it (becomes `Delivered-To:`, see the module header), the
    /// forwarding address for remote ones.
    pub address: String,
    /// `Some(user)` for a local mailbox, `None` for a remote address.
    pub mailbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// One of our domains: deliver to these destinations (never empty).
    Local(Vec<Destination>),
    /// Not one of our domains: only trusted clients may relay there.
    Relay,
    /// One of our domains, but nobody by that name.
    Unknown,
}

impl Runtime {
    /// Resolves `postmaster` with no domain (RFC 5321 §4.1.1.3).
    pub fn resolve_postmaster(&self) -> Resolution {
        match self.users.get(&self.postmaster) {
            Some(user) => Resolution::Local(vec![Destination {
                address: user.primary_address.clone(),
                mailbox: Some(user.name.clone()),
            }]),
            None => Resolution::Unknown,
        }
    }

    /// Resolves `local_part@domain`, `domain` a name (the session decides
    /// about address literals: only postmaster at our own one is local).
    pub fn resolve(&self, local_part: &str, domain: &str) -> Resolution {
        if !self.is_local_domain(domain) {
            return Resolution::Relay;
        }
        let domain = domain.to_lowercase();
        let address = format!("{}@{}", local_part.to_lowercase(), domain);
        let given = format!("{local_part}@{domain}");
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        if !self.expand(&address, &given, 0, &mut seen, &mut out) {
            return Resolution::Unknown;
        }
        let mut unique = HashSet::new();
        out.retain(|d| {
            unique.insert(
                d.mailbox
                    .clone()
                    .map(Ok)
                    .unwrap_or_else(|| Err(d.address.clone())),
            )
        });
        if out.is_empty() {
            Resolution::Unknown
        } else {
            Resolution::Local(out)
        }
    }

    /// Whether `address` is one of `user`'s for sending (RFC 6409 sender
    /// checks): their own addresses, with or without a subaddress tag, and
    /// aliases that reach their mailbox. Not postmaster or a catch-all: those
    /// deliver to someone without making the address theirs.
    pub fn sender_belongs_to(&self, address: &str, user: &str) -> bool {
        let address = address.to_lowercase();
        let Some((local, domain)) = address.rsplit_once('@') else {
            return false;
        };
        if !self.local_domains.contains(domain) {
            return false;
        }
        let reaches_user = |candidate: &str| {
            let mut out = Vec::new();
            let mut seen = HashSet::new();
            self.lookup(candidate, candidate, 0, &mut seen, &mut out) == Some(true)
                && out.iter().any(|d| d.mailbox.as_deref() == Some(user))
        };
        if reaches_user(&address) {
            return true;
        }
        match self.subaddress_separator {
            Some(sep) => match local.split_once(sep) {
                Some((base, _tag)) if !base.is_empty() => reaches_user(&format!("{base}@{domain}")),
                _ => false,
            },
            None => false,
        }
    }

    /// Alias targets that lead to no mailbox, as (alias, target), sorted:
    /// for the config check.
    pub(super) fn dead_alias_targets(&self) -> Vec<(String, String)> {
        let mut dead = Vec::new();
        for (alias, targets) in &self.aliases {
            let domain = alias.rsplit_once('@').map_or("", |(_, d)| d);
            for target in targets {
                let mut seen = HashSet::from([alias.clone()]);
                if !self.expand_target(target, domain, 0, &mut seen, &mut Vec::new()) {
                    dead.push((alias.clone(), target.clone()));
                }
            }
        }
        dead.sort();
        dead
    }

    /// Adds the destinations of a local `address` (lower-cased) to `out`;
    /// false if the address is unknown. `shown` is how a copy names it when
    /// it is a user's own address (the `Delivered-To:`).
    fn expand(
        &self,
        address: &str,
        shown: &str,
        depth: usize,
        seen: &mut HashSet<String>,
        out: &mut Vec<Destination>,
    ) -> bool {
        if depth > MAX_ALIAS_DEPTH || !seen.insert(address.to_string()) {
            return self.push_user_address(address, shown, out);
        }
        let Some((local, domain)) = address.rsplit_once('@') else {
            return false;
        };
        if let Some(found) = self.lookup(address, shown, depth, seen, out) {
            return found;
        }
        if let Some(sep) = self.subaddress_separator
            && let Some((base, _tag)) = local.split_once(sep)
            && !base.is_empty()
        {
            // The copy still names the tagged address (Postfix keeps the
            // extension in Delivered-To: filters sort on it).
            let base_address = format!("{base}@{domain}");
            if let Some(found) = self.lookup(&base_address, shown, depth, seen, out) {
                return found;
            }
        }
        if local == "postmaster" {
            return self.push_user(&self.postmaster, Some(domain), out);
        }
        if let Some(user) = self.catch_all.get(domain) {
            return self.push_user(user, Some(domain), out);
        }
        false
    }

    /// Alias or user address lookup; `None` when neither exists. `shown`:
    /// as in `expand`.
    fn lookup(
        &self,
        address: &str,
        shown: &str,
        depth: usize,
        seen: &mut HashSet<String>,
        out: &mut Vec<Destination>,
    ) -> Option<bool> {
        if let Some(targets) = self.aliases.get(address) {
            let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
            let mut any = false;
            for target in targets {
                any |= self.expand_target(target, domain, depth, seen, out);
            }
            return Some(any);
        }
        if self.addresses.contains_key(address) {
            return Some(self.push_user_address(address, shown, out));
        }
        None
    }

    /// One target of an alias in `domain`.
    fn expand_target(
        &self,
        target: &str,
        domain: &str,
        depth: usize,
        seen: &mut HashSet<String>,
        out: &mut Vec<Destination>,
    ) -> bool {
        if !target.contains('@') {
            return self.push_user(target, Some(domain), out);
        }
        match target.rsplit_once('@') {
            Some((_, domain)) if self.local_domains.contains(domain) => {
                self.expand(target, target, depth + 1, seen, out)
            }
            Some(_) => {
                out.push(Destination {
                    address: target.to_string(),
                    mailbox: None,
                });
                true
            }
            None => false,
        }
    }

    /// The user `name`, reached by name: their copy names `name@domain`,
    /// or with no domain (`<postmaster>`) their primary address.
    fn push_user(&self, name: &str, domain: Option<&str>, out: &mut Vec<Destination>) -> bool {
        match self.users.get(name) {
            Some(user) => {
                out.push(Destination {
                    address: match domain {
                        Some(domain) if !domain.is_empty() => format!("{name}@{domain}"),
                        _ => user.primary_address.clone(),
                    },
                    mailbox: Some(user.name.clone()),
                });
                true
            }
            None => false,
        }
    }

    /// The owner of `address` (lower-cased), their copy naming `shown`.
    fn push_user_address(&self, address: &str, shown: &str, out: &mut Vec<Destination>) -> bool {
        match self.addresses.get(address) {
            Some(name) => {
                out.push(Destination {
                    address: shown.to_string(),
                    mailbox: Some(name.clone()),
                });
                true
            }
            None => false,
        }
    }
}
