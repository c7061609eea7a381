//! A container that dies without a detach is released (found by the soak,
//! issue 17 part 4): the DNS server the daemon runs inside it holds its
//! namespace, so its interface never went away and its address, name and
//! rules were held forever. Once no process and no mount holds the
//! namespace, the daemon takes the interface down and releases the rest.
//!
//! Addresses: 198.19.92.0/24.

mod common;

use common::*;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_container_whose_namespace_is_deleted_is_released() {
    let Some(mut w) = World::new("container_gone") else {
        return;
    };
    let range = "198.19.92.0/24";
    let h1 = w.add_host();
    w.launch(&h1, &["--ipalloc-range", range]);
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let ip1 = w.attach_net(&h1, &c1, range);
    let ip2 = w.attach_net(&h1, &c2, range);
    // c1's DNS server answers inside it: the daemon holds sockets there.
    wait_until(DEADLINE, "c1 resolves c2", || {
        let out = c1.exec(
            "dig",
            &[
                "@127.0.0.11",
                "+short",
                "+time=1",
                "+tries=1",
                "c2.mesh.local",
            ],
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).contains(&ip2)
    });
    // c1 dies without a detach: its namespace is deleted (and made again,
    // empty and not attached, for the harness to clean up).
    ip(&["netns", "del", &c1.ns]);
    ip(&["netns", "add", &c1.ns]);
    wait_until(DEADLINE, "h1 forgets c1", || {
        h1.attached(&c1.name).is_none()
    });
    let links = ip(&["-n", &h1.ns, "-o", "link", "show"]);
    assert_eq!(
        links.matches(": vmesh").count(),
        1,
        "one interface (c2's) left: {links}"
    );
    wait_until(DEADLINE, "c1's name is gone", || {
        !h1.mesh(&["dns-lookup", "c1"]).status.success()
    });
    // c2 lives on, and c1's address is free again.
    assert_eq!(h1.attached(&c2.name).map(|(_, ip)| ip), Some(ip2.clone()));
    let ipam = h1.mesh_ok(&["status", "ipam"]);
    assert!(
        ipam.contains(", 255 free"),
        "c1's address {ip1} not released: {ipam}"
    );
}
