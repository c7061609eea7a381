//! Sleeve rekeying on real daemons (issue 15, item 6): with a password,
//! each direction's sleeve key is replaced over the control channel, and
//! traffic goes on through the change.
//!
//! Two hosts with a password on the sleeve, with the hidden test-only
//! thresholds tiny: h1 replaces its sending key after 20 sealed messages,
//! h2 after 2 seconds. A continuous ping (150 echoes, 0.1 s apart) from c1
//! to c2 loses at most [`MAX_LOST`] of them; 16 MiB of bulk TCP each way
//! arrive intact; and `mesh report` shows each side's sending key id
//! advanced by several rekeys, and the other side's newest key for it
//! following. Without rekeying the key ids stay at 1 (and the report has no
//! `sleeve_keys`), and the test fails.

mod common;

use common::*;
use std::time::Duration;

/// The password.
const PASSWORD: &str = "rekey-s3cret";
/// How long containers may take to reach each other at first.
const SETUP: Duration = Duration::from_secs(30);
/// Echoes of the continuous ping.
const PINGS: u32 = 150;
/// Echoes the continuous ping may lose (none are expected: the receiver
/// holds the new key before the sender uses it, and the old one for a
/// grace after; the bound allows for a loaded machine).
const MAX_LOST: u32 = 2;
/// Rekeys each direction must have made by the end.
const MIN_REKEYS: u64 = 3;

/// `connections[].sleeve_keys` of `host`'s one established connection:
/// (our sending key id, the peer's newest key id, rekeys).
#[track_caller]
fn keys(host: &Host) -> (u64, u64, u64) {
    let r = report(host);
    let conns: Vec<&serde_json::Value> = r["connections"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["state"] == "established").collect())
        .unwrap_or_default();
    let [c] = conns.as_slice() else {
        panic!("{}: not one established connection: {r}", host.name);
    };
    let k = &c["sleeve_keys"];
    match (
        k["send_key_id"].as_u64(),
        k["recv_key_id"].as_u64(),
        k["rekeys"].as_u64(),
    ) {
        (Some(s), Some(r), Some(n)) => (s, r, n),
        _ => panic!("{}: no sleeve key ids in {c}", host.name),
    }
}

/// Key ids count 1..=255 and wrap: how far `to` is ahead of `from`.
fn advanced(from: u64, to: u64) -> u64 {
    (to + 255 - from) % 255
}

/// From `ping -q`'s summary, echoes sent and received.
fn ping_counts(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse::<u32>().ok());
    Some((nums.next()?, nums.next()?))
}

#[test]
fn sleeve_rekeys_under_traffic() {
    let Some(mut w) = World::new("rekey") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let common = ["--no-fastdp", "--password", PASSWORD];
    let mut a1 = common.to_vec();
    a1.extend_from_slice(&["--rekey-after-messages", "20"]);
    let mut a2 = common.to_vec();
    a2.extend_from_slice(&["--rekey-after-secs", "2", "198.18.0.1"]);
    w.launch(&h1, &a1);
    w.launch(&h2, &a2);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    wait_ping(&c1, "198.19.1.2", SETUP);
    wait_ping(&c2, "198.19.1.1", SETUP);
    let (s1, _, n1) = keys(&h1);
    let (s2, _, n2) = keys(&h2);
    eprintln!("rekey: before the ping, h1 seals with key {s1} ({n1} rekeys), h2 with {s2} ({n2})");

    let count = PINGS.to_string();
    let out = c1.exec(
        "ping",
        &[
            "-n",
            "-q",
            "-c",
            &count,
            "-i",
            "0.1",
            "-W",
            "2",
            "198.19.1.2",
        ],
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (sent, received) =
        ping_counts(&text).unwrap_or_else(|| panic!("no ping summary: {}", show(&out)));
    eprintln!("rekey: continuous ping: {received} of {sent} echoes answered");
    assert_eq!(sent, PINGS, "{}", show(&out));
    assert!(
        sent - received <= MAX_LOST,
        "{} of {sent} echoes lost through rekeys (at most {MAX_LOST}): {}",
        sent - received,
        show(&out)
    );

    bulk_tcp(&c1, &c2, "198.19.1.2:5201", 16 << 20);
    bulk_tcp(&c2, &c1, "198.19.1.1:5202", 16 << 20);

    let (e1, r1, m1) = keys(&h1);
    let (e2, r2, m2) = keys(&h2);
    eprintln!(
        "rekey: after: h1 seals with key {e1}, opens h2's {r1}, {m1} rekeys; h2 seals with {e2}, opens h1's {r2}, {m2} rekeys"
    );
    // h1 by count (20 messages: the ping alone needs 150), h2 by age.
    assert!(
        advanced(s1, e1) >= MIN_REKEYS,
        "h1's sending key went from {s1} to {e1} only"
    );
    assert!(
        advanced(s2, e2) >= MIN_REKEYS,
        "h2's sending key went from {s2} to {e2} only"
    );
    // Each side opens the other's newest key, or the one offered next.
    assert!(
        advanced(e2, r1) <= 1,
        "h1 opens h2's key {r1}, h2 seals with {e2}"
    );
    assert!(
        advanced(e1, r2) <= 1,
        "h2 opens h1's key {r2}, h1 seals with {e1}"
    );
    assert!(
        m1 >= n1 + 2 * MIN_REKEYS && m2 >= n2 + 2 * MIN_REKEYS,
        "rekeys {m1}, {m2}"
    );
}
