//! Prometheus metrics: the few instruments the daemon's tasks update as
//! they go, and the rendering of one scrape.
//!
//! Most of what `/metrics` shows is already in the report (`mesh report`,
//! [`Status`]): a scrape asks for a fresh status and turns it into metrics,
//! so the two can never disagree. What the report does not hold is counted
//! here, in process-wide instruments of the `prometheus-client` crate
//! (atomics: the tasks that update them never wait for each other or for a
//! scrape): the allocation latency (the IPAM driver, where a request is
//! answered), gossip bytes per channel and direction (the router, where
//! messages pass), handshake failures by reason (the control connections).
//! The kernel's counters of the sleeve's TAP and the fast path's VXLAN
//! device, and the DNS server's, come in as [`Extra`].
//!
//! Every label value is from a closed set or from the report's own names
//! (peers, reasons the daemon defines): nothing a remote peer sends picks a
//! label, so the number of series stays bounded.
//!
//! The text is produced by `prometheus-client`'s Prometheus text encoder
//! (format 0.0.4, what `promtool check metrics` and every Prometheus read),
//! never formatted by hand.

use crate::api::{ConnState, Status};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::LazyLock;

/// A label set: names fixed in the code, values from closed sets.
pub type Labels = Vec<(&'static str, String)>;

/// The `Content-Type` of what [`render`] returns.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The instruments the daemon's tasks update.
pub struct Instruments {
    /// Seconds from an allocation or claim request to its answer (a
    /// success once the ring's file is written).
    pub ipam_allocation_seconds: Histogram,
    /// Gossip bytes by `channel` (`topology`, `ipam`, `dns`, `other`) and
    /// `direction` (`in`, `out`).
    pub gossip_bytes: Family<Labels, Counter>,
    /// Control connections that ended before their handshake was done, by
    /// `reason` (see [`handshake_reason`]).
    pub handshake_failures: Family<Labels, Counter>,
}

/// The values of [`handshake_reason`].
pub const HANDSHAKE_REASONS: [&str; 9] = [
    "password", "version", "not_mesh", "self", "timeout", "closed", "auth", "protocol", "other",
];

/// The values of [`gossip_channel`].
pub const GOSSIP_CHANNELS: [&str; 5] = ["topology", "ipam", "dns", "other", "malformed"];

static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(|| {
    let i = Instruments {
        // 1 ms to ~65 s: an answer from our own space takes a millisecond
        // or two (the ring's file is written first), one that waits for
        // consensus or for space from another peer seconds.
        ipam_allocation_seconds: Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 4.0, 9),
        ),
        gossip_bytes: Family::default(),
        handshake_failures: Family::default(),
    };
    // Every series from the start, at 0: a rate over a series that appears
    // only with its first event misses that event.
    for reason in HANDSHAKE_REASONS {
        drop(
            i.handshake_failures
                .get_or_create(&vec![("reason", reason.to_string())]),
        );
    }
    for channel in GOSSIP_CHANNELS {
        for direction in ["in", "out"] {
            drop(i.gossip_bytes.get_or_create(&vec![
                ("channel", channel.to_string()),
                ("direction", direction.to_string()),
            ]));
        }
    }
    i
});

/// The process's instruments.
pub fn instruments() -> &'static Instruments {
    &INSTRUMENTS
}

/// Count one gossip message of `bytes` (its encoding) going `direction`.
pub fn count_gossip(direction: &'static str, bytes: &[u8]) {
    let labels = vec![
        ("channel", gossip_channel(bytes).to_string()),
        ("direction", direction.to_string()),
    ];
    instruments()
        .gossip_bytes
        .get_or_create(&labels)
        .inc_by(bytes.len() as u64);
}

/// The channel a gossip message belongs to: `topology` for the gossip
/// core's own messages, the channel's name for IPAM (`ipam`) and names
/// (`dns`), `other` for a channel this daemon does not serve and
/// `malformed` for bytes that do not decode (the core refuses them).
pub fn gossip_channel(bytes: &[u8]) -> &'static str {
    use mesh_proto::gossip::wire::Body;
    match Body::decode(bytes) {
        Ok(Body::Channel(c)) => match c.channel.as_str() {
            "ipam" => "ipam",
            "dns" => "dns",
            _ => "other",
        },
        Ok(_) => "topology",
        Err(_) => "malformed",
    }
}

/// Count a connection that ended during its handshake.
pub fn count_handshake_failure(reason: &str) {
    let labels = vec![("reason", handshake_reason(reason).to_string())];
    instruments()
        .handshake_failures
        .get_or_create(&labels)
        .inc();
}

/// A handshake's failure, as a label: `password` (one side has a password,
/// the other none, or they differ), `version` (no protocol version in
/// common), `not_mesh` (the other end does not speak mesh), `self` (we
/// dialled our own address), `timeout`, `closed` (the other end went away),
/// `auth` (the Noise handshake failed: a wrong key or a tampered message),
/// `protocol` (a message out of order), `other`.
pub fn handshake_reason(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("password") || r.contains("psk") {
        "password"
    } else if r.contains("version") {
        "version"
    } else if r.contains("not a mesh peer") {
        "not_mesh"
    } else if r.contains("ourselves") {
        "self"
    } else if r.contains("timed out") {
        "timeout"
    } else if r.contains("eof") || r.contains("reset") || r.contains("closed") {
        "closed"
    } else if r.contains("protocol error") {
        "protocol"
    } else if r.contains("handshake") || r.contains("decrypt") || r.contains("key") {
        "auth"
    } else {
        "other"
    }
}

/// Kernel packet and byte counters of a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceCounters {
    /// Frames the device received (from the overlay, to the bridge).
    pub rx_packets: u64,
    /// Frames the device sent (from the bridge, to the overlay).
    pub tx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The DNS server's counters: queries by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DnsCounters {
    /// Answered from the mesh's names with addresses.
    pub answered: u64,
    /// Answered from the mesh's names: no such name (NXDOMAIN) or no
    /// record of that type.
    pub not_found: u64,
    /// Not the mesh's: sent to the upstream servers.
    pub forwarded: u64,
    /// Answered SERVFAIL (no upstream answered, or too many in flight).
    pub failed: u64,
    /// Not answered (not a query, too short).
    pub dropped: u64,
}

/// What a scrape adds to the report.
#[derive(Debug, Clone, Default)]
pub struct Extra {
    /// The kernel counters of each overlay's device: `sleeve` (the TAP)
    /// and `fastdp` (the VXLAN device), those that exist.
    pub devices: Vec<(&'static str, DeviceCounters)>,
    /// The DNS server's counters, when it serves.
    pub dns: Option<DnsCounters>,
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

fn gauge_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, i64)>,
) {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in rows {
        f.get_or_create(&l).inc_by(v);
    }
    reg.register(name, help, f);
}

fn counter_family(
    reg: &mut Registry,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, u64)>,
) {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in rows {
        f.get_or_create(&l).inc_by(v);
    }
    reg.register(name, help, f);
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn as_i64(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// Every connection state, so that a state with no connection reads 0.
const STATES: [ConnState; 5] = [
    ConnState::Connecting,
    ConnState::Handshaking,
    ConnState::Established,
    ConnState::Retrying,
    ConnState::Failed,
];

/// One scrape: the report `status` and the `extra` counters, with the
/// instruments, in the Prometheus text format. Names are prefixed `mesh_`;
/// counters end in `_total`.
pub fn render(status: &Status, extra: &Extra) -> String {
    let mut reg = Registry::with_prefix("mesh");
    let i = instruments();

    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&labels(&[
        ("version", &status.version),
        ("protocol", &status.protocol),
        ("peer", &status.name),
        ("nickname", &status.nickname),
        (
            "encryption",
            if status.encryption { "true" } else { "false" },
        ),
    ]))
    .set(1);
    reg.register("build_info", "This peer: version, protocol, name", info);

    // Connections by state and, once established, overlay.
    let mut conns: std::collections::BTreeMap<(&str, &str), i64> =
        STATES.iter().map(|s| ((s.as_str(), "none"), 0)).collect();
    for c in &status.connections {
        let overlay = match (c.state, c.overlay) {
            (ConnState::Established, Some(o)) => o.as_str(),
            _ => "none",
        };
        *conns.entry((c.state.as_str(), overlay)).or_default() += 1;
    }
    gauge_family(
        &mut reg,
        "connections",
        "Connections and attempts by state and overlay (none until established)",
        conns
            .into_iter()
            .map(|((s, o), n)| (labels(&[("state", s), ("overlay", o)]), n)),
    );
    gauge(
        &mut reg,
        "peers_known",
        "Peers known by gossip, this one included",
        as_i64(status.peers.len()),
    );
    gauge(
        &mut reg,
        "peers_reachable",
        "Peers with a route from here, this one included",
        as_i64(status.peers.iter().filter(|p| p.reachable).count()),
    );
    gauge(
        &mut reg,
        "problems",
        "Problems the report lists",
        as_i64(status.problems.len()),
    );

    // The data path.
    let s = &status.sleeve;
    counter_family(
        &mut reg,
        "sleeve_datagrams",
        "Sleeve UDP datagrams by direction (in: received and accepted)",
        [
            (labels(&[("direction", "in")]), s.datagrams_in),
            (labels(&[("direction", "out")]), s.datagrams_out),
        ],
    );
    let c = Counter::<u64>::default();
    c.inc_by(s.frames_in);
    reg.register(
        "sleeve_tap_frames_read",
        "Frames the sleeve read from its TAP device",
        c,
    );
    let c = Counter::<u64>::default();
    c.inc_by(s.sealed_out);
    reg.register(
        "sleeve_messages_sealed",
        "Sleeve messages sealed (encrypted)",
        c,
    );
    let c = Counter::<u64>::default();
    c.inc_by(s.relayed);
    reg.register(
        "sleeve_messages_relayed",
        "Sleeve messages relayed on towards other peers",
        c,
    );
    let mut frames = Vec::new();
    let mut bytes = Vec::new();
    for (overlay, d) in &extra.devices {
        frames.push((
            labels(&[("overlay", overlay), ("direction", "in")]),
            d.rx_packets,
        ));
        frames.push((
            labels(&[("overlay", overlay), ("direction", "out")]),
            d.tx_packets,
        ));
        bytes.push((
            labels(&[("overlay", overlay), ("direction", "in")]),
            d.rx_bytes,
        ));
        bytes.push((
            labels(&[("overlay", overlay), ("direction", "out")]),
            d.tx_bytes,
        ));
    }
    counter_family(
        &mut reg,
        "overlay_frames",
        "Ethernet frames by overlay and direction, the kernel's counters of its device (sleeve: the TAP; fastdp: the VXLAN device)",
        frames,
    );
    counter_family(
        &mut reg,
        "overlay_bytes",
        "Ethernet bytes by overlay and direction, the kernel's counters of its device",
        bytes,
    );
    counter_family(
        &mut reg,
        "sleeve_drops",
        "Sleeve datagrams, messages or frames dropped, by reason",
        s.drops.iter().map(|(r, n)| (labels(&[("reason", r)]), *n)),
    );
    counter_family(
        &mut reg,
        "filter_drops",
        "Frames dropped by the host's nftables rules (isolation, spoofing, the fast path's port filter), by reason",
        status
            .drops
            .iter()
            .map(|(r, n)| (labels(&[("reason", r)]), *n)),
    );

    // The allocator.
    if let Some(ipam) = &status.ipam {
        gauge(
            &mut reg,
            "ipam_ready",
            "1 once the address ring exists (containers can be attached)",
            i64::from(ipam.state == "ready"),
        );
        let mine = ipam.peers.iter().find(|p| p.peer == status.name);
        let owned = mine.map_or(0, |p| p.owned);
        let free = mine.map_or(0, |p| p.free);
        gauge_family(
            &mut reg,
            "ipam_addresses",
            "Addresses of the range this peer owns, by state (owned, free of those, used)",
            [
                (labels(&[("state", "owned")]), as_i64(owned)),
                (labels(&[("state", "free")]), as_i64(free)),
                (
                    labels(&[("state", "used")]),
                    as_i64(owned.saturating_sub(free)),
                ),
            ],
        );
        gauge(
            &mut reg,
            "ipam_pending_requests",
            "Allocation requests waiting (consensus, space asked of another peer)",
            as_i64(ipam.pending.len()),
        );
        gauge_family(
            &mut reg,
            "ipam_ring_addresses",
            "Each peer's share of the ring as this peer sees it, by state (owned, free)",
            ipam.peers.iter().flat_map(|p| {
                [
                    (
                        labels(&[
                            ("peer", &p.peer),
                            ("nickname", &p.nickname),
                            ("state", "owned"),
                        ]),
                        as_i64(p.owned),
                    ),
                    (
                        labels(&[
                            ("peer", &p.peer),
                            ("nickname", &p.nickname),
                            ("state", "free"),
                        ]),
                        as_i64(p.free),
                    ),
                ]
            }),
        );
    }
    reg.register(
        "ipam_allocation_seconds",
        "Time from an allocation or claim request to its answer (success or failure)",
        i.ipam_allocation_seconds.clone(),
    );

    // Names.
    if let Some(dns) = &status.dns {
        gauge(
            &mut reg,
            "dns_names",
            "Names of the mesh served (every peer's)",
            as_i64(dns.entries.len()),
        );
    }
    if let Some(d) = &extra.dns {
        counter_family(
            &mut reg,
            "dns_queries",
            "DNS queries by outcome: answered (addresses from the mesh's names), not_found (NXDOMAIN or no record of that type), forwarded (upstream), failed (SERVFAIL), dropped",
            [
                ("answered", d.answered),
                ("not_found", d.not_found),
                ("forwarded", d.forwarded),
                ("failed", d.failed),
                ("dropped", d.dropped),
            ]
            .map(|(k, n)| (labels(&[("outcome", k)]), n)),
        );
    }

    // The control plane.
    reg.register(
        "gossip_bytes",
        "Gossip bytes by channel (topology, ipam, dns) and direction",
        i.gossip_bytes.clone(),
    );
    reg.register(
        "handshake_failures",
        "Control connections that ended before their handshake was done, by reason",
        i.handshake_failures.clone(),
    );

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ConnStatus, IpamPeer, IpamStatus, Overlay, SleeveStats};

    fn status() -> Status {
        Status {
            version: "0.3.0".into(),
            protocol: "2..=2".into(),
            name: "02:00:00:00:00:01".into(),
            nickname: "host1".into(),
            encryption: false,
            port: 6783,
            mtu: 1400,
            connections: vec![ConnStatus {
                direction: "outbound".into(),
                address: "198.18.0.2:6783".into(),
                state: ConnState::Established,
                peer: Some("02:00:00:00:00:02".into()),
                nickname: Some("host\"2".into()),
                encrypted: false,
                info: None,
                overlay: Some(Overlay::Fastdp),
                overlay_info: None,
                path_mtu: None,
                sleeve_keys: None,
            }],
            peers: Vec::new(),
            targets: Vec::new(),
            sleeve: SleeveStats {
                drops: [("auth".to_string(), 2)].into_iter().collect(),
                ..SleeveStats::default()
            },
            drops: [("isolation".to_string(), 3)].into_iter().collect(),
            problems: Vec::new(),
            ipam: Some(IpamStatus {
                state: "ready".into(),
                peers: vec![IpamPeer {
                    peer: "02:00:00:00:00:01".into(),
                    nickname: "host\"1\n".into(),
                    owned: 256,
                    free: 250,
                    reachable: true,
                }],
                ..IpamStatus::default()
            }),
            dns: None,
        }
    }

    #[test]
    fn a_scrape_has_the_reports_numbers() {
        let text = render(
            &status(),
            &Extra {
                devices: vec![(
                    "fastdp",
                    DeviceCounters {
                        rx_packets: 5,
                        tx_packets: 6,
                        rx_bytes: 700,
                        tx_bytes: 800,
                    },
                )],
                dns: Some(DnsCounters {
                    answered: 4,
                    ..DnsCounters::default()
                }),
            },
        );
        for line in [
            "mesh_connections{state=\"established\",overlay=\"fastdp\"} 1",
            "mesh_connections{state=\"retrying\",overlay=\"none\"} 0",
            "mesh_sleeve_drops_total{reason=\"auth\"} 2",
            "mesh_filter_drops_total{reason=\"isolation\"} 3",
            "mesh_ipam_addresses{state=\"used\"} 6",
            "mesh_ipam_ready 1",
            "mesh_overlay_bytes_total{overlay=\"fastdp\",direction=\"out\"} 800",
            "mesh_dns_queries_total{outcome=\"answered\"} 4",
            "# TYPE mesh_ipam_allocation_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        // A nickname's quote and newline are escaped, not a broken line.
        assert!(text.contains(r#"nickname="host\"1\n""#), "{text}");
    }

    #[test]
    fn handshake_reasons_are_a_closed_set() {
        for (reason, want) in [
            ("the peer has a password and we have none", "password"),
            ("no protocol version in common: theirs 1..=1", "version"),
            ("not a mesh peer: bad magic", "not_mesh"),
            ("connected to ourselves (this address is our own)", "self"),
            ("handshake: timed out", "timeout"),
            ("reading hello: early eof", "closed"),
            ("handshake failed: decrypt error", "auth"),
            (
                "protocol error: transport record during handshake",
                "protocol",
            ),
            ("anything", "other"),
        ] {
            assert_eq!(handshake_reason(reason), want, "{reason}");
            assert!(HANDSHAKE_REASONS.contains(&want));
        }
    }

    #[test]
    fn gossip_channels_are_a_closed_set() {
        assert_eq!(gossip_channel(b"\xff\xff garbage"), "malformed");
        assert_eq!(gossip_channel(b""), "malformed");
    }
}
