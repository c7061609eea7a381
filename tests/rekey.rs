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
//!
//! Three hosts in a chain (h1 and h3 cut off from each other, both reach
//! h2), every key replaced after 20 messages or 2 s: a continuous ping and
//! bulk TCP from c1 to c3, relayed by h2 and so sealed under two
//! connections' keys each way, come through the rekeys of both hops.

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

/// `connections[].sleeve_keys` of each of `host`'s established
/// connections: (our sending key id, the peer's newest key id, rekeys).
#[track_caller]
fn all_keys(host: &Host) -> Vec<(u64, u64, u64)> {
    let r = report(host);
    let conns: Vec<&serde_json::Value> = r["connections"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["state"] == "established").collect())
        .unwrap_or_default();
    conns
        .iter()
        .map(|c| {
            let k = &c["sleeve_keys"];
            match (
                k["send_key_id"].as_u64(),
                k["recv_key_id"].as_u64(),
                k["rekeys"].as_u64(),
            ) {
                (Some(s), Some(r), Some(n)) => (s, r, n),
                _ => panic!("{}: no sleeve key ids in {c}", host.name),
            }
        })
        .collect()
}

/// [`all_keys`] of `host`'s one established connection.
#[track_caller]
fn keys(host: &Host) -> (u64, u64, u64) {
    match all_keys(host).as_slice() {
        [k] => *k,
        other => panic!("{}: not one established connection: {other:?}", host.name),
    }
}

/// `ping` from `from` to `ip`, [`PINGS`] echoes 0.1 s apart; asserts at
/// most [`MAX_LOST`] were lost.
#[track_caller]
fn continuous_ping(from: &Container, ip: &str) {
    let count = PINGS.to_string();
    let out = from.exec(
        "ping",
        &["-n", "-q", "-c", &count, "-i", "0.1", "-W", "2", ip],
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (sent, received) =
        ping_counts(&text).unwrap_or_else(|| panic!("no ping summary: {}", show(&out)));
    eprintln!(
        "rekey: continuous ping {} -> {ip}: {received} of {sent} echoes answered",
        from.name
    );
    assert_eq!(sent, PINGS, "{}", show(&out));
    assert!(
        sent - received <= MAX_LOST,
        "{} of {sent} echoes lost through rekeys (at most {MAX_LOST}): {}",
        sent - received,
        show(&out)
    );
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

    continuous_ping(&c1, "198.19.1.2");

    bulk_tcp(&c1, &c2, "198.19.1.2:5201", 16 << 20);
    bulk_tcp(&c2, &c1, "198.19.1.1:5202", 16 << 20);

    let dropped = |h: &Host| report(h)["sleeve"]["dropped"].as_u64().unwrap_or(0);
    eprintln!(
        "rekey: sleeve datagrams dropped: h1 {}, h2 {}",
        dropped(&h1),
        dropped(&h2)
    );
    // Each side opens the other's sending key, or the one it offers next.
    // The two reports are not one snapshot (a rekey may fall between
    // them): polled until they agree, as they do between rekeys.
    let ((e1, r1, m1), (e2, r2, m2)) = wait_for(
        Duration::from_secs(15),
        "each side opening the other's sending key",
        || {
            let (k1, k2) = (keys(&h1), keys(&h2));
            let ((e1, r1, _), (e2, r2, _)) = (k1, k2);
            if advanced(e2, r1) <= 1 && advanced(e1, r2) <= 1 {
                Ok((k1, k2))
            } else {
                Err(format!("h1 {k1:?}, h2 {k2:?}"))
            }
        },
    );
    eprintln!(
        "rekey: after: h1 seals with key {e1}, opens h2's {r1}, {m1} rekeys; h2 seals with {e2}, opens h1's {r2}, {m2} rekeys"
    );
    let text = h1.mesh_ok(&["status", "connections"]);
    eprintln!("rekey: h1's mesh status connections:\n{text}");
    assert!(
        text.contains(" keys ") && text.contains(" rekeys)"),
        "h1's status does not show its sleeve keys: {text}"
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
    assert!(
        m1 >= n1 + 2 * MIN_REKEYS && m2 >= n2 + 2 * MIN_REKEYS,
        "rekeys {m1}, {m2}"
    );
}

#[test]
fn relayed_sleeve_rekeys_on_both_hops() {
    let Some(mut w) = World::new("rekey_relayed") else {
        return;
    };
    let args = [
        "--no-fastdp",
        "--password",
        PASSWORD,
        "--rekey-after-messages",
        "20",
        "--rekey-after-secs",
        "2",
    ];
    let ([_, h2, _], c1, c3) = w.relay_chain(&args);
    wait_ping(&c1, "198.19.1.3", SETUP);
    wait_ping(&c3, "198.19.1.1", SETUP);
    let before = all_keys(&h2);
    assert_eq!(before.len(), 2, "h2's connections: {before:?}");
    continuous_ping(&c1, "198.19.1.3");
    bulk_tcp(&c1, &c3, "198.19.1.3:5201", 16 << 20);
    let after = all_keys(&h2);
    eprintln!("rekey: h2's keys before {before:?}, after {after:?}");
    assert_eq!(after.len(), 2, "h2's connections: {after:?}");
    for ((_, _, n0), (_, _, n1)) in before.iter().zip(&after) {
        assert!(n1 >= &(n0 + 2 * MIN_REKEYS), "h2: rekeys {n0} -> {n1}");
    }
}
