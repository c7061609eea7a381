//! The human forms of `mesh status` and its parts.

use crate::api;

/// The drop counters that are not zero, by reason: the host's filters
/// first, then the sleeve's (`sleeve REASON N`); `none` when all are zero.
pub fn format_drops(s: &api::Status) -> String {
    let mut parts: Vec<String> = s
        .drops
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    parts.extend(
        s.sleeve
            .drops
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("sleeve {r} {n}")),
    );
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// The human form of `mesh status`.
pub fn format_status(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let established = s
        .connections
        .iter()
        .filter(|c| c.state == api::ConnState::Established)
        .count();
    let failed = s
        .connections
        .iter()
        .filter(|c| matches!(c.state, api::ConnState::Failed | api::ConnState::Retrying))
        .count();
    let _ = writeln!(
        o,
        "        Version: {} (protocol {})",
        s.version, s.protocol
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "           Name: {}({})", s.name, s.nickname);
    let _ = writeln!(
        o,
        "     Encryption: {}",
        if s.encryption { "enabled" } else { "disabled" }
    );
    let _ = writeln!(o, "           Port: {}", s.port);
    let _ = writeln!(o, "            MTU: {}", s.mtu);
    let _ = writeln!(
        o,
        "    Connections: {} ({} established, {} failed)",
        s.connections.len(),
        established,
        failed
    );
    let st = &s.sleeve;
    let _ = writeln!(
        o,
        "         Sleeve: {} frames in, {} datagrams out ({} sealed), {} in, {} relayed, {} dropped",
        st.frames_in, st.datagrams_out, st.sealed_out, st.datagrams_in, st.relayed, st.dropped
    );
    let _ = writeln!(o, "          Drops: {}", format_drops(s));
    let _ = writeln!(
        o,
        "          Peers: {} ({} reachable)",
        s.peers.len(),
        s.peers.iter().filter(|p| p.reachable).count()
    );
    let _ = writeln!(o, "        Targets: {}", s.targets.len());
    format_status_parts(s, &mut o);
    if !s.connections.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "CONNECTIONS");
        o.push_str(&format_connections(s));
    }
    o
}

/// The DNS, IPAM and problem lines of `mesh status`.
fn format_status_parts(s: &api::Status, o: &mut String) {
    use std::fmt::Write;
    if let Some(d) = &s.dns {
        let _ = writeln!(
            o,
            "            DNS: {}, {} names",
            if d.serving {
                format!("serving {}", d.domain)
            } else {
                "not serving".to_string()
            },
            d.entries.len()
        );
    }
    if let Some(i) = &s.ipam {
        let mine = i.peers.iter().find(|p| p.peer == s.name);
        let _ = writeln!(
            o,
            "           IPAM: {}, range {}{}",
            i.state,
            i.range,
            mine.map(|p| format!(", {} owned here ({} free)", p.owned, p.free))
                .unwrap_or_default()
        );
    }
    // The allocator's problems too (another ring met, a claim in space we
    // lost): they are what a user must act on.
    let ipam_problems = s.ipam.iter().flat_map(|i| &i.problems);
    for p in s.problems.iter().chain(ipam_problems) {
        let _ = writeln!(o, "        Problem: {p}");
    }
}

/// `mesh status dns`: `NAME ADDRESS CONTAINER PEER`, one line each.
pub fn format_dns(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    match &s.dns {
        None => o.push_str("the daemon reports no DNS\n"),
        Some(d) => {
            if !d.serving {
                o.push_str("not serving DNS here (--no-dns); names of the mesh:\n");
            }
            for e in &d.entries {
                let _ = writeln!(
                    o,
                    "{:<24} {:<15} {:<14} {}",
                    e.name, e.addr, e.container, e.peer
                );
            }
        }
    }
    o
}

/// `mesh status ipam`: the ring as this peer sees it.
pub fn format_ipam(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let Some(i) = &s.ipam else {
        return "the daemon reports no address allocator\n".into();
    };
    let total: u64 = i.peers.iter().map(|p| p.owned).sum();
    let _ = writeln!(
        o,
        "Range: {}  Default subnet: {}",
        i.range, i.default_subnet
    );
    let _ = writeln!(o, "State: {}", i.state);
    for p in &i.peers {
        let pct = if total == 0 {
            0.0
        } else {
            p.owned as f64 * 100.0 / total as f64
        };
        let who = if p.nickname.is_empty() {
            p.peer.clone()
        } else {
            format!("{}({})", p.peer, p.nickname)
        };
        let this = if p.peer == s.name {
            "  (this peer)"
        } else if p.reachable {
            ""
        } else {
            "  - unreachable!"
        };
        let _ = writeln!(
            o,
            "{who}  {} IPs ({pct:.1}% of total), {} free{this}",
            p.owned, p.free
        );
    }
    for p in &i.pending {
        let _ = writeln!(o, "Pending: {p}");
    }
    for p in &i.problems {
        let _ = writeln!(o, "Problem: {p}");
    }
    o
}

/// `mesh status peers`: each peer, its route and its connections.
pub fn format_peers(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    for p in &s.peers {
        let route = if p.name == s.name {
            "(this peer)".to_string()
        } else {
            match (&p.next_hop, p.reachable) {
                (Some(h), true) if *h == p.name => "direct".to_string(),
                (Some(h), true) => format!("via {h}"),
                _ => "unreachable".to_string(),
            }
        };
        let key = p.key.as_deref().unwrap_or("-");
        let _ = writeln!(o, "{}({})  {}  key {}", p.name, p.nickname, route, key);
        if let Some(k) = &p.refused_key {
            let _ = writeln!(o, "   !! another key claims this name: {k} (refused)");
        }
        for c in &p.connections {
            let _ = writeln!(
                o,
                "   -> {} {} {}",
                c.peer,
                c.address.as_deref().unwrap_or("-"),
                if c.established {
                    "established"
                } else {
                    "pending"
                }
            );
        }
    }
    o
}

/// `mesh status connections`: one line per connection or attempt.
pub fn format_connections(s: &api::Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    {
        for c in &s.connections {
            let arrow = if c.direction == "inbound" { "<-" } else { "->" };
            let peer = match (&c.peer, &c.nickname) {
                (Some(p), Some(n)) => format!("{p}({n})"),
                (Some(p), None) => p.clone(),
                _ => String::new(),
            };
            let mut line = format!("  {arrow} {:<21} {:<12}", c.address, c.state);
            if c.state == api::ConnState::Established {
                line.push_str(match (c.overlay, c.encrypted) {
                    (Some(api::Overlay::Fastdp), _) => " fastdp ",
                    (_, true) => " encrypted sleeve ",
                    _ => " sleeve ",
                });
                line.push_str(&peer);
            } else {
                line.push(' ');
                line.push_str(&peer);
            }
            if let Some(i) = &c.info {
                line.push_str("  ");
                line.push_str(i);
            }
            if let Some(i) = &c.overlay_info {
                line.push_str("  (sleeve: ");
                line.push_str(i);
                line.push(')');
            }
            if let (Some(m), Some(api::Overlay::Sleeve)) = (c.path_mtu, c.overlay) {
                let _ = write!(line, "  path MTU {m}");
            }
            if let Some(k) = c.sleeve_keys {
                let _ = write!(
                    line,
                    "  keys {}/{} ({} rekeys)",
                    k.send_key_id, k.recv_key_id, k.rekeys
                );
            }
            let _ = writeln!(o, "{}", line.trim_end());
        }
    }
    o
}
