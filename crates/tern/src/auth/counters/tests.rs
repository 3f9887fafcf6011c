use super::*;
use std::net::Ipv4Addr;

const T: u64 = 1_800_000_000_000;
const MIN: u64 = 60_000;

fn key(ip: &str, account: &'static str) -> LoginKey<'static> {
    LoginKey {
        client_ip: ip.parse().unwrap(),
        account,
    }
}

#[test]
fn networks() {
    assert_eq!(
        network_of("192.0.2.77".parse().unwrap()),
        "192.0.2.0".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        network_of("::ffff:192.0.2.77".parse().unwrap()),
        "192.0.2.0".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        network_of("2001:db8:1:2:3:4:5:6".parse().unwrap()),
        "2001:db8:1:2::".parse::<IpAddr>().unwrap()
    );
}

#[test]
fn ip_limit_in_a_sliding_window() {
    let c = MemoryCounters::new(LoginLimits::default());
    // Four failures, the first one old enough to slide out of the window.
    c.failed_now(key("192.0.2.1", "a"), T);
    for i in 1..4 {
        c.failed_now(key("192.0.2.1", "a"), T + 14 * MIN + i);
    }
    c.failed_now(key("192.0.2.1", "b"), T + 15 * MIN + 1);
    assert_eq!(
        c.admit_now(key("192.0.2.1", "c"), T + 15 * MIN + 2),
        Admission::Admitted
    );
    c.failed_now(key("192.0.2.1", "c"), T + 15 * MIN + 3);
    assert_eq!(
        c.admit_now(key("192.0.2.1", "d"), T + 15 * MIN + 4),
        Admission::ClientLocked
    );
    // Another IP of another network is not concerned; the lock ends.
    assert_eq!(
        c.admit_now(key("198.51.100.1", "d"), T + 15 * MIN + 4),
        Admission::Admitted
    );
    assert_eq!(
        c.admit_now(key("192.0.2.1", "e"), T + 31 * MIN),
        Admission::Admitted
    );
}

#[test]
fn network_limit_catches_neighbours() {
    let c = MemoryCounters::new(LoginLimits::default());
    for i in 0..20u8 {
        c.failed_now(
            LoginKey {
                client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, i)),
                account: "x",
            },
            T,
        );
    }
    assert_eq!(
        c.admit_now(key("192.0.2.200", "y"), T + 1),
        Admission::ClientLocked
    );
    assert_eq!(
        c.admit_now(key("192.0.3.200", "y"), T + 1),
        Admission::Admitted
    );
}

#[test]
fn account_slot_and_lock_and_known_clients() {
    let c = MemoryCounters::new(LoginLimits::default());
    // Unknown clients: one attempt per minute per account.
    assert_eq!(
        c.admit_now(key("192.0.2.1", "alice"), T),
        Admission::Admitted
    );
    assert_eq!(
        c.admit_now(key("198.51.100.1", "alice"), T + 1),
        Admission::AccountBusy
    );
    assert_eq!(
        c.admit_now(key("198.51.100.1", "bob"), T + 1),
        Admission::Admitted
    );
    // The slot's holder has not concluded yet: busy, not locked.
    assert_eq!(
        c.admit_now(key("198.51.100.1", "bob"), T + 2),
        Admission::AccountBusy
    );
    c.failed_now(key("198.51.100.1", "bob"), T + 2);
    assert_eq!(
        c.admit_now(key("198.51.100.1", "bob"), T + 3),
        Admission::AccountLocked
    );
    // A success frees the slot and makes the network known.
    c.succeeded_now(key("192.0.2.1", "alice"), T + 2);
    assert_eq!(
        c.admit_now(key("198.51.100.1", "alice"), T + 3),
        Admission::Admitted
    );
    // Ten failures from ten networks, a minute apart: the account locks.
    for i in 0..10u64 {
        let ip = format!("203.0.{i}.1");
        let now = T + MIN * (i + 1) + 10;
        assert_eq!(
            c.admit_now(key(&ip, "alice"), now),
            Admission::Admitted,
            "{i}"
        );
        c.failed_now(key(&ip, "alice"), now);
    }
    assert_eq!(
        c.admit_now(key("203.0.99.1", "alice"), T + 12 * MIN),
        Admission::AccountLocked
    );
    // The owner's known network still gets in, and its failures do not
    // count against the account.
    assert_eq!(
        c.admit_now(key("192.0.2.9", "alice"), T + 12 * MIN),
        Admission::Admitted
    );
    assert_eq!(
        c.admit_now(key("203.0.99.1", "alice"), T + 11 * MIN + 16 * MIN),
        Admission::Admitted
    );
}

#[test]
fn memory_is_bounded() {
    let limits = LoginLimits {
        max_entries: 1000,
        ..LoginLimits::default()
    };
    let c = MemoryCounters::new(limits);
    for i in 0..20_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 256));
        c.failed_now(
            LoginKey {
                client_ip: ip,
                account: "x",
            },
            T + u64::from(i),
        );
        assert!(c.len() <= 1001, "{} after {i}", c.len());
    }
    // The most recent ones are still counted.
    let last = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + 19_999 * 256));
    for _ in 0..4 {
        c.failed_now(
            LoginKey {
                client_ip: last,
                account: "x",
            },
            T + 20_000,
        );
    }
    assert_eq!(
        c.admit_now(
            LoginKey {
                client_ip: last,
                account: "y"
            },
            T + 20_001
        ),
        Admission::ClientLocked
    );
}

/// Memory of a full table (`-- --ignored --nocapture`): resident size
/// before and after 100,000 client IPs with one failure each.
#[test]
#[ignore]
fn measure_memory() {
    fn resident_kib() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4
    }
    let before = resident_kib();
    let c = MemoryCounters::new(LoginLimits::default());
    for i in 0..200_000u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i * 64));
        c.failed_now(
            LoginKey {
                client_ip: ip,
                account: "x",
            },
            T + u64::from(i),
        );
    }
    let after = resident_kib();
    println!(
        "{} keys: {} KiB, {} bytes per key",
        c.len(),
        after - before,
        (after - before) * 1024 / c.len() as u64
    );
}
