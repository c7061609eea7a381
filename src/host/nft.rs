//! Isolation enforced on the bridge: nftables rules (bridge family) bound to
//! each container port's MAC and addresses (DESIGN.md §5).
//!
//! For every attached container's host-side port `vmesh…`:
//!
//! - **from the port** (hooks `forward` and `input`): the source MAC must be
//!   the container's, only IPv4 and ARP pass, and the IPv4/ARP sender address
//!   must be one of its addresses. A container that changes its MAC or
//!   spoofs an address is cut off.
//! - **from the port to another port** (hook `forward`): the IPv4/ARP target
//!   must be inside one of its subnets. Adding a route to another subnet
//!   gets it nowhere. (Frames to the host itself go through `input`, where
//!   only the anti-spoofing applies, so an exposing host can route for it.)
//! - **to the port** (hooks `forward` and `output`): the IPv4/ARP sender must
//!   be inside one of its subnets, whoever forwarded the frame (another
//!   port, the sleeve's TAP, the fast path).
//!
//! A port whose MAC is not known yet is quarantined (everything dropped),
//! so the rules are in place before the interface first comes up.
//!
//! The whole table `bridge mesh` is rebuilt from the list of ports in one
//! `nft -f` transaction on every change: the kernel swaps old for new
//! atomically, a restart or a crash can leave nothing stale, and there are
//! no rule handles to track. At a few rules per port this costs a few
//! milliseconds even for hundreds of containers.

use ipnet::Ipv4Net;
use std::fmt::Write;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// The nftables table (family `bridge`).
pub const TABLE: &str = "mesh";

/// One container port and what it may send and receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Host-side interface name.
    pub ifname: String,
    /// The container's MAC; `None` quarantines the port.
    pub mac: Option<String>,
    /// Its addresses, each with its subnet's prefix.
    pub addrs: Vec<Ipv4Net>,
}

fn set<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", v.join(", "))
}

fn chain_id(ifname: &str) -> String {
    ifname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// The complete script for these ports: replaces the table atomically.
pub fn script(ports: &[Port]) -> String {
    let mut s = String::new();
    // Create-then-delete makes the delete succeed whether or not the table
    // exists; all of it is one transaction.
    let _ = writeln!(s, "table bridge {TABLE}\ndelete table bridge {TABLE}");
    let _ = writeln!(s, "table bridge {TABLE} {{");
    let mut from = Vec::new();
    let mut to_other = Vec::new();
    let mut to = Vec::new();
    for p in ports {
        let id = chain_id(&p.ifname);
        let name = &p.ifname;
        match (&p.mac, p.addrs.is_empty()) {
            (Some(mac), false) => {
                let addrs = set(p.addrs.iter().map(|a| a.addr()));
                let mut nets: Vec<Ipv4Net> = p.addrs.iter().map(|a| a.trunc()).collect();
                nets.sort();
                nets.dedup();
                let nets = set(nets);
                let _ = writeln!(
                    s,
                    "  chain from_{id} {{
    ether saddr != {mac} drop
    ether type != {{ ip, arp }} drop
    ether type ip ip saddr != {addrs} drop
    ether type arp arp saddr ether != {mac} drop
    ether type arp arp saddr ip != {addrs} drop
  }}
  chain from_{id}_to_other {{
    ether type ip ip daddr != {nets} drop
    ether type arp arp daddr ip != {nets} drop
  }}
  chain to_{id} {{
    ether type ip ip saddr != {nets} drop
    ether type arp arp saddr ip != {nets} drop
  }}"
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "  chain from_{id} {{ drop; }}\n  chain from_{id}_to_other {{ drop; }}\n  chain to_{id} {{ drop; }}"
                );
            }
        }
        from.push(format!("\"{name}\" : jump from_{id}"));
        to_other.push(format!("\"{name}\" : jump from_{id}_to_other"));
        to.push(format!("\"{name}\" : jump to_{id}"));
    }
    let vmap = |key: &str, entries: &[String]| -> String {
        if entries.is_empty() {
            String::new()
        } else {
            format!("    {key} vmap {{ {} }}\n", entries.join(", "))
        }
    };
    let _ = write!(
        s,
        "  chain forward {{
    type filter hook forward priority 0; policy accept;
{}{}{}  }}
  chain input {{
    type filter hook input priority 0; policy accept;
{}  }}
  chain output {{
    type filter hook output priority 0; policy accept;
{}  }}
}}
",
        vmap("iifname", &from),
        vmap("iifname", &to_other),
        vmap("oifname", &to),
        vmap("iifname", &from),
        vmap("oifname", &to),
    );
    s
}

async fn nft(script: &str) -> Result<(), String> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("running nft ({e}): isolation needs nftables (apt-get install nftables)")
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| format!("writing to nft: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        Err(format!("nft refused the isolation rules: {first}"))
    }
}

/// Make the kernel's rules exactly those for `ports`.
pub async fn sync(ports: &[Port]) -> Result<(), String> {
    nft(&script(ports)).await
}

/// Remove the tables (`mesh reset`).
pub async fn remove() -> Result<(), String> {
    nft(&format!(
        "table bridge {TABLE}\ndelete table bridge {TABLE}\ntable ip {TABLE}\ndelete table ip {TABLE}\n"
    ))
    .await
}

/// The NAT of exposed subnets (`mesh expose`), table `ip mesh`: traffic
/// from a subnet to anywhere else leaves masqueraded as the host; traffic
/// from outside the subnet that the host forwards onto the bridge enters
/// masqueraded as the host's address in the subnet, so containers on any
/// host answer it within their subnet, whatever their routes.
pub fn nat_script(bridge: &str, exposed: &[Ipv4Net]) -> String {
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\n");
    if exposed.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "table ip {TABLE} {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;"
    );
    for e in exposed {
        let net = e.trunc();
        let _ = writeln!(
            s,
            "    ip saddr {net} ip daddr != {net} oifname != \"{bridge}\" masquerade\n    oifname \"{bridge}\" ip saddr != {net} ip daddr {net} snat to {}",
            e.addr()
        );
    }
    s.push_str("  }\n}\n");
    s
}

/// Make the NAT rules those of `exposed`.
pub async fn sync_nat(bridge: &str, exposed: &[Ipv4Net]) -> Result<(), String> {
    nft(&nat_script(bridge, exposed)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, mac: Option<&str>, addrs: &[&str]) -> Port {
        Port {
            ifname: name.into(),
            mac: mac.map(String::from),
            addrs: addrs.iter().map(|a| a.parse().expect("cidr")).collect(),
        }
    }

    #[test]
    fn script_binds_mac_addresses_and_subnets() {
        let s = script(&[port(
            "vmesh0a1b2c3d",
            Some("0a:58:c6:13:01:05"),
            &["198.19.1.5/24", "198.19.2.7/24"],
        )]);
        assert!(s.contains("ether saddr != 0a:58:c6:13:01:05 drop"), "{s}");
        assert!(
            s.contains("ip saddr != { 198.19.1.5, 198.19.2.7 } drop"),
            "{s}"
        );
        assert!(
            s.contains("ip daddr != { 198.19.1.0/24, 198.19.2.0/24 } drop"),
            "{s}"
        );
        assert!(s.contains("iifname vmap { \"vmesh0a1b2c3d\" : jump from_vmesh0a1b2c3d }"));
        assert!(s.starts_with("table bridge mesh\ndelete table bridge mesh\n"));
    }

    #[test]
    fn unknown_mac_quarantines() {
        let s = script(&[port("vmeshq", None, &["198.19.1.5/24"])]);
        assert!(s.contains("chain from_vmeshq { drop; }"), "{s}");
        assert!(s.contains("chain to_vmeshq { drop; }"), "{s}");
    }

    #[test]
    fn nat_masquerades_out_and_snats_in() {
        let s = nat_script("mesh", &["198.19.2.1/24".parse().expect("cidr")]);
        assert!(
            s.contains(
                "ip saddr 198.19.2.0/24 ip daddr != 198.19.2.0/24 oifname != \"mesh\" masquerade"
            ),
            "{s}"
        );
        assert!(s.contains("oifname \"mesh\" ip saddr != 198.19.2.0/24 ip daddr 198.19.2.0/24 snat to 198.19.2.1"), "{s}");
        assert_eq!(
            nat_script("mesh", &[]),
            "table ip mesh\ndelete table ip mesh\n"
        );
    }

    #[test]
    fn no_ports_no_maps() {
        let s = script(&[]);
        assert!(!s.contains("vmap"), "{s}");
        assert!(s.contains("hook forward"));
    }
}
