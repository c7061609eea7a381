//! The status page at `/` and the topology picture it shows.
//!
//! The page is one self-contained HTML document (inline style and script,
//! no external asset: hosts often have no internet) that asks `/status`
//! and `/topology.svg` every 1.5 s and redraws its tables: peers,
//! connections (state, overlay), the IPAM ring's shares, names. Values
//! from the status (nicknames come from other peers) are put in the page
//! as text nodes, never as markup.
//!
//! The picture is drawn here, by the daemon, from the status: every known
//! peer a node on a circle (filled when reachable, grey when not, ringed
//! for this peer), every established connection a line. Text in it is
//! XML-escaped.

use crate::api::Status;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// The page.
pub const HTML: &str = include_str!("page.html");

/// The picture's size (square), in px.
const SIZE: f64 = 420.0;

/// `s` with XML's special characters escaped (text and attribute values).
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The mesh as an SVG document: peers on a circle, connections as lines.
pub fn svg(status: &Status) -> String {
    let n = status.peers.len();
    let centre = SIZE / 2.0;
    let radius = if n <= 1 { 0.0 } else { SIZE / 2.0 - 60.0 };
    let pos: BTreeMap<&str, (f64, f64)> = status
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let a =
                std::f64::consts::TAU * i as f64 / n.max(1) as f64 - std::f64::consts::FRAC_PI_2;
            (
                p.name.as_str(),
                (centre + radius * a.cos(), centre + radius * a.sin()),
            )
        })
        .collect();
    // Each established connection once, whichever end reports it.
    let mut edges = BTreeSet::new();
    for p in &status.peers {
        for c in p.connections.iter().filter(|c| c.established) {
            if pos.contains_key(c.peer.as_str()) && c.peer != p.name {
                let (a, b) = if p.name < c.peer {
                    (p.name.as_str(), c.peer.as_str())
                } else {
                    (c.peer.as_str(), p.name.as_str())
                };
                edges.insert((a, b));
            }
        }
    }
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="topology" width="{SIZE}" height="{SIZE}" viewBox="0 0 {SIZE} {SIZE}" data-peers="{n}" data-connections="{}">"#,
        edges.len()
    );
    let _ = write!(
        out,
        "<title>mesh topology: {n} peers, {} connections</title>",
        edges.len()
    );
    for (a, b) in &edges {
        let ((x1, y1), (x2, y2)) = (pos[a], pos[b]);
        let _ = write!(
            out,
            r##"<line class="edge" data-a="{}" data-b="{}" x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="#5c6bc0" stroke-width="2"/>"##,
            escape(a),
            escape(b)
        );
    }
    for p in &status.peers {
        let (x, y) = pos[p.name.as_str()];
        let me = p.name == status.name;
        let fill = if p.reachable { "#43a047" } else { "#bdbdbd" };
        let ring = if me { "#1565c0" } else { "#424242" };
        let label = if p.nickname.is_empty() {
            p.name.as_str()
        } else {
            p.nickname.as_str()
        };
        let _ = write!(
            out,
            r#"<g class="node" data-peer="{}" data-nickname="{}" data-reachable="{}" data-self="{me}"><circle cx="{x:.1}" cy="{y:.1}" r="18" fill="{fill}" stroke="{ring}" stroke-width="{}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-family="sans-serif" font-size="12">{}</text><title>{} ({})</title></g>"#,
            escape(&p.name),
            escape(&p.nickname),
            p.reachable,
            if me { 4 } else { 1 },
            y + 34.0,
            escape(label),
            escape(&p.name),
            if p.reachable {
                "reachable"
            } else {
                "unreachable"
            },
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PeerConn, PeerStatus, SleeveStats};

    fn peer(name: &str, nick: &str, reachable: bool, to: &[&str]) -> PeerStatus {
        PeerStatus {
            name: name.into(),
            nickname: nick.into(),
            reachable,
            next_hop: None,
            connections: to
                .iter()
                .map(|t| PeerConn {
                    peer: (*t).into(),
                    address: None,
                    established: true,
                })
                .collect(),
            key: None,
            refused_key: None,
        }
    }

    #[test]
    fn every_peer_a_node_every_connection_one_line() {
        let status = Status {
            version: String::new(),
            protocol: String::new(),
            name: "a".into(),
            nickname: "host-a".into(),
            encryption: false,
            port: 6783,
            mtu: 1400,
            connections: Vec::new(),
            peers: vec![
                peer("a", "host-a", true, &["b", "c"]),
                peer("b", "<b&\"", true, &["a"]),
                peer("c", "host-c", false, &["a", "zz"]),
            ],
            targets: Vec::new(),
            sleeve: SleeveStats::default(),
            drops: Default::default(),
            problems: Vec::new(),
            ipam: None,
            dns: None,
        };
        let s = svg(&status);
        assert_eq!(s.matches("<g class=\"node\"").count(), 3, "{s}");
        assert_eq!(s.matches("<line class=\"edge\"").count(), 2, "{s}");
        assert!(s.contains("&lt;b&amp;&quot;"), "{s}");
        assert!(!s.contains("<b&"), "{s}");
        assert!(s.contains(r#"data-peer="c" data-nickname="host-c" data-reachable="false""#));
        assert!(s.contains(r#"data-self="true""#));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        assert!(!HTML.contains("http://") && !HTML.contains("https://"));
        assert!(HTML.contains("/status") && HTML.contains("/topology.svg"));
    }
}
