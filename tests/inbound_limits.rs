//! A flood of connections from one address (issue 15, "Connections"): past
//! a handful per source the daemon refuses them at once and says so, and a
//! real peer from another address still joins while the flood is held.
//!
//! Addresses: the test's own underlay, 198.18.0.0/24.

mod common;

use common::*;
use std::net::TcpStream;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_flood_from_one_address_is_refused_and_a_peer_still_joins() {
    let Some(mut w) = World::new("a_flood_from_one_address_is_refused_and_a_peer_still_joins")
    else {
        return;
    };
    let (h1, h2, h3) = (w.add_host(), w.add_host(), w.add_host());
    w.launch(&h1, &[]);
    // h3 runs no daemon: it opens silent connections to h1 and holds them.
    let flood: Vec<TcpStream> = in_netns(&h3.ns, || {
        (0..40)
            .filter_map(|_| TcpStream::connect(("198.18.0.1", PORT)).ok())
            .collect()
    });
    assert_eq!(flood.len(), 40, "the kernel accepts every connection");
    let log = h1.run_dir.join("mesh.log");
    wait_until(DEADLINE, "h1 refuses the flood from h3", || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("too many inbound connections from 198.18.0.3")
    });
    // A real peer from another address joins while the flood is held.
    w.launch(&h2, &["198.18.0.1"]);
    wait_until(DEADLINE, "h1 and h2 connect", || {
        h1.mesh_ok(&["status", "connections"])
            .lines()
            .any(|l| l.contains("198.18.0.2") && l.contains("established"))
    });
    drop(flood);
}
