//! Isolation enforced on the bridge: nftables rules (bridge family) bound to
//! each container port's MAC and addresses (DESIGN.md §5), and the filter
//! that keeps the fast path's UDP port for members.
//!
//! # The bridge table `bridge mesh`
//!
//! Fixed rules over sets that say, per container port `vmesh…`, its MAC
//! (`port_mac`), its addresses (`port_ip`) and its subnets (`port_net`),
//! and which MACs are this host's own (`local_mac`: containers' and the
//! bridge's):
//!
//! - **from a port** (hook `prerouting`, so before the bridge learns the
//!   source MAC): the source MAC must be the port's, only IPv4 and ARP
//!   pass (IPv6 and every other ethertype are dropped: the overlay does not
//!   route them, and they would otherwise reach every subnet), and the
//!   IPv4/ARP sender address must be one of the port's. A container that
//!   changes its MAC or spoofs an address is cut off, and cannot teach the
//!   bridge that another container's MAC is behind it.
//! - **from a port to another port** (hook `forward`): the IPv4/ARP target
//!   must be inside one of its subnets (adding a route to another subnet
//!   gets it nowhere), except IPv4 multicast and the limited broadcast,
//!   which go to every port and overlay and are filtered where they are
//!   delivered. Frames to the host itself are not checked here, so an
//!   exposing host can route for its subnet.
//! - **to a port** (hook `forward`, whoever forwarded the frame: another
//!   port, the sleeve's TAP, the fast path): only IPv4 and ARP, and the
//!   IPv4/ARP sender must be inside one of the port's subnets. A subnet's
//!   broadcasts and multicasts therefore reach its own containers only.
//!   What the host itself sends (hook `output`) is checked for its
//!   ethertype only: an exposing host routes replies from anywhere back to
//!   its subnet's containers; the host never routes from one mesh subnet to
//!   another (see [`nat_script`]).
//! - **from an overlay** (the TAP or the VXLAN device, hook `prerouting`):
//!   a frame whose source MAC is one of this host's own is dropped. Local
//!   MACs are learnt from attach, never from the overlay, so no member can
//!   take over a local container's traffic.
//!
//! A `vmesh…` port without entries (its MAC not known yet, or unknown to
//! this daemon) fails the first check: quarantined, everything dropped. So
//! the rules are in place before an interface first comes up.
//!
//! Every drop is counted by reason in a named counter ([`REASONS`]), read
//! by [`counters`] for `mesh status`.
//!
//! The table itself is made once per daemon process (deleted and made
//! again, so a restart or a crash leaves nothing stale); every change after
//! that replaces the sets' contents in one `nft -f` transaction, which the
//! kernel applies atomically, and the counters keep counting.
//!
//! # The underlay table `inet mesh_fastdp`
//!
//! The fast path's VXLAN device takes any datagram to its UDP port and
//! puts the frame inside on the bridge. The set `peers` holds the underlay
//! addresses of the peers that have a fast-path connection with us; a
//! datagram to the port from any other address is dropped (and counted as
//! `vxlan_not_peer`) in hook `input`, before the VXLAN socket sees it.

use super::nftnl;
use ipnet::Ipv4Net;
use mesh_proto::name::mac_string;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::AsyncWriteExt;

/// The nftables table (family `bridge`).
pub const TABLE: &str = "mesh";
/// The underlay table (family `inet`) guarding the fast path's port.
pub const UNDERLAY_TABLE: &str = "mesh_fastdp";
/// Host-side names of container ports start with this.
pub const PORT_PREFIX: &str = "vmesh";

/// The bridge table's drop counters: reason, and what it means.
pub const REASONS: &[(&str, &str)] = &[
    (
        "spoofed",
        "a container sent from a MAC or address it was not given, or from a quarantined port",
    ),
    ("isolation", "a frame from one subnet to another"),
    (
        "ethertype",
        "IPv6 or another ethertype the overlay does not route",
    ),
    (
        "mac_claim",
        "a frame from the overlay whose source is one of this host's MACs",
    ),
];
/// The underlay table's drop counter.
pub const VXLAN_REASON: &str = "vxlan_not_peer";

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

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    v.join(", ")
}

/// The script that makes the bridge table afresh, its sets empty (every
/// container port quarantined).
pub fn table_script() -> String {
    let mut s = String::new();
    // Create-then-delete makes the delete succeed whether or not the table
    // exists; all of it is one transaction.
    let _ = writeln!(s, "table bridge {TABLE}\ndelete table bridge {TABLE}");
    let _ = writeln!(s, "table bridge {TABLE} {{");
    for (reason, _) in REASONS {
        let _ = writeln!(s, "  counter {reason} {{ }}");
    }
    let overlays = format!(
        "\"{}\", \"{}\"",
        super::TAP,
        crate::datapath::fastdp::DEVICE
    );
    let p = PORT_PREFIX;
    let _ = write!(
        s,
        "  set port_mac {{ type ifname . ether_addr; }}
  set port_ip {{ type ifname . ipv4_addr; }}
  set port_net {{ type ifname . ipv4_addr; flags interval; }}
  set local_mac {{ type ether_addr; }}
  chain prerouting {{
    type filter hook prerouting priority -200; policy accept;
    iifname \"{p}*\" jump from_port
    iifname {{ {overlays} }} ether saddr @local_mac counter name mac_claim drop
  }}
  chain from_port {{
    iifname . ether saddr != @port_mac counter name spoofed drop
    ether type != {{ ip, arp }} counter name ethertype drop
    ether type ip iifname . ip saddr != @port_ip counter name spoofed drop
    ether type arp iifname . arp saddr ether != @port_mac counter name spoofed drop
    ether type arp iifname . arp saddr ip != @port_ip counter name spoofed drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname \"{p}*\" jump from_port_to_other
    oifname \"{p}*\" jump to_port
  }}
  chain from_port_to_other {{
    ether type ip ip daddr {{ 224.0.0.0/4, 255.255.255.255 }} return
    ether type ip iifname . ip daddr != @port_net counter name isolation drop
    ether type arp iifname . arp daddr ip != @port_net counter name isolation drop
  }}
  chain to_port {{
    ether type != {{ ip, arp }} counter name ethertype drop
    ether type ip oifname . ip saddr != @port_net counter name isolation drop
    ether type arp oifname . arp saddr ip != @port_net counter name isolation drop
  }}
  chain output {{
    type filter hook output priority 0; policy accept;
    oifname \"{p}*\" ether type != {{ ip, arp }} counter name ethertype drop
  }}
}}
"
    );
    s
}

/// What the bridge table's four sets hold for some ports: one model that
/// both `nft -f` scripts ([`Elements::script`]) and netlink batches
/// ([`Elements::changes`]) are made from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Elements {
    port_mac: BTreeSet<(String, [u8; 6])>,
    port_ip: BTreeSet<(String, Ipv4Addr)>,
    port_net: BTreeSet<(String, Ipv4Net)>,
    local_mac: BTreeSet<[u8; 6]>,
}

/// `xx:xx:xx:xx:xx:xx` (written like a peer name: six hex bytes).
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    s.parse::<mesh_proto::name::PeerName>()
        .map(|p| p.0)
        .map_err(|_| format!("not a MAC address: {s:?}"))
}

impl Elements {
    /// The elements for exactly `ports` and `local_macs` (MACs as
    /// `xx:xx:…`). A port without a MAC or addresses gets none
    /// (quarantined).
    pub fn new(ports: &[Port], local_macs: &[String]) -> Result<Elements, String> {
        let mut e = Elements::default();
        for p in ports {
            let Some(mac) = &p.mac else {
                continue; // quarantined: no entries at all
            };
            if p.addrs.is_empty() {
                continue;
            }
            let name = &p.ifname;
            e.port_mac.insert((name.clone(), parse_mac(mac)?));
            e.port_ip
                .extend(p.addrs.iter().map(|a| (name.clone(), a.addr())));
            let ns: BTreeSet<Ipv4Net> = p.addrs.iter().map(|a| a.trunc()).collect();
            // Nested subnets of one port: the widest covers the others (an
            // interval set refuses overlapping elements).
            e.port_net.extend(
                ns.iter()
                    .filter(|n| !ns.iter().any(|o| o != *n && o.contains(*n)))
                    .map(|n| (name.clone(), *n)),
            );
        }
        for m in local_macs {
            e.local_mac.insert(parse_mac(m)?);
        }
        Ok(e)
    }

    /// The script that makes the sets say exactly this, replacing what
    /// they held, in one transaction.
    pub fn script(&self) -> String {
        let mut s = String::new();
        for (set, elems) in [
            (
                "port_mac",
                list(
                    self.port_mac
                        .iter()
                        .map(|(n, m)| format!("\"{n}\" . {}", mac_string(*m))),
                ),
            ),
            (
                "port_ip",
                list(self.port_ip.iter().map(|(n, a)| format!("\"{n}\" . {a}"))),
            ),
            (
                "port_net",
                list(self.port_net.iter().map(|(n, a)| format!("\"{n}\" . {a}"))),
            ),
            (
                "local_mac",
                list(self.local_mac.iter().map(|m| mac_string(*m))),
            ),
        ] {
            let _ = writeln!(s, "flush set bridge {TABLE} {set}");
            if !elems.is_empty() {
                let _ = writeln!(s, "add element bridge {TABLE} {set} {{ {elems} }}");
            }
        }
        s
    }

    /// The netlink changes that take the sets from holding `self` to
    /// holding `to`: what goes first, then what comes. `None` when a name
    /// cannot be a key (longer than an interface name can be).
    pub fn changes(&self, to: &Elements) -> Option<Vec<nftnl::Change<'static>>> {
        let cat = |name: &str, value: &[u8]| {
            let mut k = nftnl::ifname(name)?.to_vec();
            nftnl::field(&mut k, value);
            Some(k)
        };
        let sets = [
            (
                "port_mac",
                diff(&self.port_mac, &to.port_mac, |(n, m)| {
                    Some(nftnl::Elem {
                        key: cat(n, m)?,
                        end: None,
                    })
                })?,
            ),
            (
                "port_ip",
                diff(&self.port_ip, &to.port_ip, |(n, a)| {
                    Some(nftnl::Elem {
                        key: cat(n, &a.octets())?,
                        end: None,
                    })
                })?,
            ),
            (
                "port_net",
                diff(&self.port_net, &to.port_net, |(n, net)| {
                    Some(nftnl::Elem {
                        key: cat(n, &net.network().octets())?,
                        end: Some(cat(n, &net.broadcast().octets())?),
                    })
                })?,
            ),
            (
                "local_mac",
                diff(&self.local_mac, &to.local_mac, |m| {
                    Some(nftnl::Elem {
                        key: m.to_vec(),
                        end: None,
                    })
                })?,
            ),
        ];
        Some(set_changes(sets))
    }
}

/// The elements in `from` but not in `to`, and those in `to` but not in
/// `from`, as keys; `None` if one has no key.
fn diff<T: Ord>(
    from: &BTreeSet<T>,
    to: &BTreeSet<T>,
    key: impl Fn(&T) -> Option<nftnl::Elem>,
) -> Option<[Vec<nftnl::Elem>; 2]> {
    let gone = from.difference(to).map(&key).collect::<Option<_>>()?;
    let new = to.difference(from).map(&key).collect::<Option<_>>()?;
    Some([gone, new])
}

/// The changes for sets' differences ([`diff`]): every deletion first,
/// then every addition (an element that moves between ports is free
/// again before it is taken).
fn set_changes<const N: usize>(
    sets: [(&'static str, [Vec<nftnl::Elem>; 2]); N],
) -> Vec<nftnl::Change<'static>> {
    let mut out = Vec::new();
    for add in [false, true] {
        for (set, [gone, new]) in &sets {
            let elems = if add { new } else { gone };
            if !elems.is_empty() {
                out.push(nftnl::Change {
                    set,
                    add,
                    elems: elems.clone(),
                });
            }
        }
    }
    out
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

/// What the bridge table's sets hold, once this process has made the
/// table (after that, a change only adds and deletes elements, and the
/// counters keep counting); `None`: make it afresh next time.
static APPLIED: std::sync::Mutex<Option<Elements>> = std::sync::Mutex::new(None);

fn held<T>(m: &'static std::sync::Mutex<Option<T>>) -> std::sync::MutexGuard<'static, Option<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Make sets say `want`. While `state` knows what they hold, the
/// difference (`changes`, None when it cannot be put as keys) goes to
/// table `table` over netlink; otherwise, or if the kernel refuses it
/// (someone changed the table), `script` is run by `nft`. `state` then
/// says what the sets hold, or `None` when that is not known.
async fn update<T: Clone + Send + 'static>(
    state: &'static std::sync::Mutex<Option<T>>,
    want: T,
    (family, table): (u8, &'static str),
    changes: impl FnOnce(&T, &T) -> Option<Vec<nftnl::Change<'static>>>,
    script: impl FnOnce(&T) -> String,
) -> Result<(), String> {
    let delta = held(state).as_ref().and_then(|h| changes(h, &want));
    if let Some(delta) = delta {
        let sent = tokio::task::spawn_blocking(move || nftnl::apply(family, table, &delta)).await;
        match sent {
            Ok(Ok(())) => {
                *held(state) = Some(want);
                return Ok(());
            }
            Ok(Err(e)) => {
                tracing::warn!("nftables table {table} missing or changed ({e}); writing it again")
            }
            Err(e) => tracing::warn!("nftables table {table}: {e}; writing it again"),
        }
    }
    let r = nft(&script(&want)).await;
    *held(state) = r.as_ref().ok().map(|()| want);
    r
}

/// Make the kernel's rules exactly those for `ports`, with `local_macs`
/// (this host's own MACs: containers' and the bridge's) refused from the
/// overlays. Once the table is made, by the elements that differ from
/// what it holds, over netlink ([`nftnl`]): no process, and the same cost
/// however many containers are attached.
pub async fn sync(ports: &[Port], local_macs: &[String]) -> Result<(), String> {
    let want = Elements::new(ports, local_macs)
        .map_err(|e| format!("nft refused the isolation rules: {e}"))?;
    update(
        &APPLIED,
        want,
        (nftnl::FAMILY_BRIDGE, TABLE),
        Elements::changes,
        // The table afresh with them.
        |w| table_script() + &w.script(),
    )
    .await
}

/// The script that makes the underlay table afresh: datagrams to the fast
/// path's UDP `port` are taken only from the addresses in its set.
pub fn underlay_script(port: u16) -> String {
    let t = UNDERLAY_TABLE;
    let r = VXLAN_REASON;
    format!(
        "table inet {t}\ndelete table inet {t}
table inet {t} {{
  counter {r} {{ }}
  set peers {{ type ipv4_addr; }}
  chain input {{
    type filter hook input priority -150; policy accept;
    udp dport {port} ip saddr != @peers counter name {r} drop
    udp dport {port} meta nfproto ipv6 counter name {r} drop
  }}
}}
"
    )
}

/// The script that makes the underlay set hold exactly `peers`.
pub fn underlay_peers_script(peers: &[Ipv4Addr]) -> String {
    let mut p = peers.to_vec();
    p.sort();
    p.dedup();
    let mut s = format!("flush set inet {UNDERLAY_TABLE} peers\n");
    if !p.is_empty() {
        let _ = writeln!(
            s,
            "add element inet {UNDERLAY_TABLE} peers {{ {} }}",
            list(&p)
        );
    }
    s
}

/// The peers the underlay table's set holds, once this process made the
/// table; `None`: unknown (the next change rewrites the set by `nft`).
static UNDERLAY_APPLIED: std::sync::Mutex<Option<BTreeSet<Ipv4Addr>>> = std::sync::Mutex::new(None);

/// Make the underlay table afresh (no peer admitted yet).
pub async fn make_underlay(port: u16) -> Result<(), String> {
    let r = nft(&underlay_script(port)).await;
    *held(&UNDERLAY_APPLIED) = r.is_ok().then(BTreeSet::new);
    r
}

/// Admit fast-path datagrams from exactly `peers`: the peers that came
/// and went, over netlink ([`nftnl`]), once the table is made.
pub async fn set_underlay_peers(peers: &[Ipv4Addr]) -> Result<(), String> {
    update(
        &UNDERLAY_APPLIED,
        peers.iter().copied().collect(),
        (nftnl::FAMILY_INET, UNDERLAY_TABLE),
        |held, want| {
            let key = |a: &Ipv4Addr| {
                Some(nftnl::Elem {
                    key: a.octets().to_vec(),
                    end: None,
                })
            };
            diff(held, want, key).map(|d| set_changes([("peers", d)]))
        },
        |want| underlay_peers_script(&want.iter().copied().collect::<Vec<_>>()),
    )
    .await
}

/// How often the daemon checks, without being told of a change, that its
/// tables are still there (a firewall reload, `nft flush ruleset`, removes
/// them): one `nft list tables`, by the attach manager, for all three
/// tables, when it cannot be told ([`changes`] gave no socket).
pub const WATCH: std::time::Duration = std::time::Duration::from_secs(60);

/// The same check while [`changes`] tells of every change within
/// [`SETTLE`]: only a backstop. A notice lost to a full socket is not
/// silent (the kernel reports the loss, which [`changes`] passes on as a
/// change), so this need not run often; an `nft` run a minute was, with
/// 100 daemons on one machine, a tenth of their CPU at rest.
pub const WATCH_TOLD: std::time::Duration = std::time::Duration::from_secs(600);

/// How long after a change to the ruleset the tables are checked (changes
/// come in bursts: one check for the burst).
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Notices of changes to this namespace's nftables ruleset: a netlink
/// socket on the nftables multicast group (what `nft monitor` reads), read
/// by a task that sends one `()` per batch of messages it reads (and when
/// the kernel says messages were lost). `None` when the socket cannot be
/// made; the caller then relies on its slow check.
pub fn changes() -> Option<tokio::sync::mpsc::Receiver<()>> {
    use nix::sys::socket::SockFlag;
    use tokio::io::unix::AsyncFd;
    /// NFNLGRP_NFTABLES.
    const GROUP: u32 = 7;
    let fd = nftnl::socket(
        1 << (GROUP - 1),
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
    )
    .ok()?;
    // SAFETY: we own `fd` (moved in), and nothing else registers or uses
    // it while the AsyncFd lives; it is closed only when the AsyncFd drops.
    let fd = unsafe { AsyncFd::register(fd) }.ok()?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return;
            };
            // Drain what is there; what it says does not matter.
            loop {
                match nix::sys::socket::recv(
                    std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(0) => return,
                    Ok(_) | Err(nix::errno::Errno::ENOBUFS) => continue,
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(_) => return,
                }
            }
            guard.clear_ready();
            match tx.try_send(()) {
                Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return,
            }
        }
    });
    Some(rx)
}

/// The standard output of `nft ARGS...` when it succeeds, `None` when it
/// fails (e.g. a table that does not exist).
async fn nft_read(args: &[&str]) -> Result<Option<Vec<u8>>, String> {
    let out = tokio::process::Command::new("nft")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running nft: {e}"))?;
    Ok(out.status.success().then_some(out.stdout))
}

/// The tables the kernel has now, as `family name` (e.g. `bridge mesh`).
pub async fn tables() -> Result<Vec<String>, String> {
    let out = nft_read(&["list", "tables"])
        .await?
        .ok_or("nft list tables failed")?;
    Ok(String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .map(str::to_string)
        .collect())
}

/// Forget that the bridge table was made: the next [`sync`] makes it
/// afresh (it was found missing).
pub fn table_lost() {
    *held(&APPLIED) = None;
}

/// Set when a check found the underlay table missing; the fast path,
/// which owns that table, takes it ([`take_underlay_lost`]) and makes it
/// again. One `nft list tables` serves both tables' owners.
static UNDERLAY_LOST: AtomicBool = AtomicBool::new(false);

/// Say that the underlay table was found missing.
pub fn underlay_lost() {
    UNDERLAY_LOST.store(true, Ordering::Release);
}

/// Whether the underlay table was found missing since the last call.
pub fn take_underlay_lost() -> bool {
    UNDERLAY_LOST.swap(false, Ordering::AcqRel)
}

/// The tables whose named counters are the drop counters.
const COUNTER_TABLES: [(&str, &str); 2] = [("bridge", TABLE), ("inet", UNDERLAY_TABLE)];

/// The drop counters of both tables, by reason (packets), from one `nft`
/// run. A table that does not exist contributes nothing.
pub async fn counters() -> Result<BTreeMap<String, u64>, String> {
    Ok(nft_read(&["-j", "list", "counters"])
        .await?
        .map(|out| parse_counters(&out))
        .unwrap_or_default())
}

/// Our tables' counters in `nft -j list counters` output: name → packets
/// (other tables' counters, the host's own, are left out).
fn parse_counters(json: &[u8]) -> BTreeMap<String, u64> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return BTreeMap::new();
    };
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| {
            let c = o.get("counter")?;
            let at = (c["family"].as_str()?, c["table"].as_str()?);
            COUNTER_TABLES.contains(&at).then_some(())?;
            Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
        })
        .collect()
}

/// Remove the tables (`mesh reset`).
pub async fn remove() -> Result<(), String> {
    nft(&format!(
        "table bridge {TABLE}\ndelete table bridge {TABLE}\ntable ip {TABLE}\ndelete table ip {TABLE}\ntable inet {UNDERLAY_TABLE}\ndelete table inet {UNDERLAY_TABLE}\n"
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
    // The host routes for its exposed subnets, never between two of the
    // mesh's subnets (that would undo the isolation on the bridge).
    let _ = writeln!(
        s,
        "  }}\n  chain forward {{\n    type filter hook forward priority 0; policy accept;"
    );
    for e in exposed {
        let net = e.trunc();
        let _ = writeln!(
            s,
            "    iifname \"{bridge}\" oifname \"{bridge}\" ip daddr {net} ip saddr != {net} drop"
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
    use crate::host::testutil::{ns_ok, ns_run, require_root, TestNet};

    /// The script that makes the sets say exactly `ports` and `local_macs`.
    fn elements(ports: &[Port], local_macs: &[String]) -> Result<String, String> {
        Ok(Elements::new(ports, local_macs)?.script())
    }

    fn port(name: &str, mac: Option<&str>, addrs: &[&str]) -> Port {
        Port {
            ifname: name.into(),
            mac: mac.map(String::from),
            addrs: addrs.iter().map(|a| a.parse().expect("cidr")).collect(),
        }
    }

    #[test]
    fn elements_bind_mac_addresses_and_subnets() {
        let s = elements(
            &[port(
                "vmesh0a1b2c3d",
                Some("0a:58:c6:13:01:05"),
                &["198.19.1.5/24", "198.19.2.7/24", "198.19.2.9/16"],
            )],
            &["0a:00:00:00:00:01".into()],
        )
        .expect("valid");
        assert!(
            s.contains("port_mac { \"vmesh0a1b2c3d\" . 0a:58:c6:13:01:05 }"),
            "{s}"
        );
        assert!(
            s.contains("port_ip { \"vmesh0a1b2c3d\" . 198.19.1.5, \"vmesh0a1b2c3d\" . 198.19.2.7, \"vmesh0a1b2c3d\" . 198.19.2.9 }"),
            "{s}"
        );
        // 198.19.0.0/16 covers both /24s: one element, no overlap.
        assert!(
            s.contains("port_net { \"vmesh0a1b2c3d\" . 198.19.0.0/16 }"),
            "{s}"
        );
        assert!(s.contains("local_mac { 0a:00:00:00:00:01 }"), "{s}");
        for set in ["port_mac", "port_ip", "port_net", "local_mac"] {
            assert!(s.contains(&format!("flush set bridge mesh {set}\n")), "{s}");
        }
    }

    #[test]
    fn unknown_mac_quarantines() {
        let s = elements(&[port("vmeshq", None, &["198.19.1.5/24"])], &[]).expect("valid");
        assert!(!s.contains("vmeshq"), "{s}");
        assert!(table_script().contains("iifname \"vmesh*\" jump from_port"));
    }

    /// The scripts are what the real `nft` takes: the table, then changes
    /// of its sets that keep the counters, then the underlay table.
    #[test]
    fn the_kernel_takes_the_scripts_and_counters_survive_changes() {
        if !require_root() {
            return;
        }
        let net = TestNet::new();
        let ns = net.add_ns("nft");
        let apply = |s: &str| {
            let f = std::env::temp_dir().join(format!("{ns}.nft"));
            std::fs::write(&f, s).expect("write script");
            let ok = ns_ok(&ns, &["nft", "-f", &f.to_string_lossy()]);
            let _ = std::fs::remove_file(&f);
            assert!(ok, "nft refused:\n{s}");
        };
        let a = port("vmesha", Some("0a:00:00:00:00:0a"), &["198.19.1.5/24"]);
        let b = port("vmeshb", Some("0a:00:00:00:00:0b"), &["198.19.2.5/24"]);
        let q = port("vmeshq", None, &["198.19.2.6/24"]);
        let made = elements(&[a.clone(), q.clone()], &["0a:00:00:00:00:0a".into()]);
        apply(&(table_script() + &made.expect("valid")));
        // Changes touch the sets only: the table, its rules and its
        // counters stay (and keep counting).
        let change = elements(&[a.clone(), b.clone()], &[]).expect("valid");
        assert!(
            !change.contains("delete") && !change.contains("counter"),
            "{change}"
        );
        apply(&change);
        apply(&elements(&[b], &["0a:00:00:00:00:0b".into()]).expect("valid"));
        let listed = ns_run(&ns, &["nft", "list", "table", "bridge", "mesh"]);
        assert!(
            listed.contains("\"vmeshb\" . 0a:00:00:00:00:0b"),
            "{listed}"
        );
        assert!(!listed.contains("vmesha"), "{listed}");
        let json = ns_run(
            &ns,
            &["nft", "-j", "list", "counters", "table", "bridge", "mesh"],
        );
        let c = parse_counters(json.as_bytes());
        for (reason, _) in REASONS {
            assert_eq!(c.get(*reason), Some(&0), "{json}");
        }
        apply(&underlay_script(6784));
        apply(&underlay_peers_script(&[
            "198.18.0.2".parse().expect("ip"),
            "198.18.0.3".parse().expect("ip"),
            "198.18.0.2".parse().expect("ip"),
        ]));
        apply(&underlay_peers_script(&[]));
        let json = ns_run(
            &ns,
            &[
                "nft",
                "-j",
                "list",
                "counters",
                "table",
                "inet",
                UNDERLAY_TABLE,
            ],
        );
        assert_eq!(
            parse_counters(json.as_bytes()).get(VXLAN_REASON),
            Some(&0),
            "{json}"
        );
    }

    #[test]
    fn a_bad_mac_is_refused_with_a_clear_error() {
        let e = Elements::new(
            &[port(
                "vmeshx",
                Some("0a:00:zz:00:00:01"),
                &["198.19.1.5/24"],
            )],
            &[],
        );
        assert_eq!(e, Err("not a MAC address: \"0a:00:zz:00:00:01\"".into()));
        assert!(Elements::new(&[], &["0a:00:00:00:00:01:02".into()]).is_err());
        assert!(Elements::new(&[], &["0a:00:00:00:00".into()]).is_err());
    }

    /// A listing with each set's elements sorted (sets list them in the
    /// order they were added, or by a hash seeded per set).
    fn sorted(t: &str) -> String {
        let mut out = String::new();
        let mut rest = t;
        while let Some(i) = rest.find("elements = {") {
            let (head, tail) = rest.split_at(i + "elements = {".len());
            let end = tail.find('}').expect("closed");
            let mut items: Vec<&str> = tail[..end].split(',').map(str::trim).collect();
            items.sort();
            out.push_str(head);
            out.push_str(&items.join(", "));
            rest = &tail[end..];
        }
        out + rest
    }

    /// Elements changed over netlink are exactly what `nft` itself
    /// writes: after every step, the table as `nft list` shows it in a
    /// namespace changed by [`nftnl`] batches is the table in one where
    /// `nft -f` wrote the same sets. And a batch that cannot apply (an
    /// element to delete that is not there) changes nothing.
    #[test]
    fn netlink_changes_leave_what_nft_would_have_written() {
        if !require_root() {
            return;
        }
        let net = TestNet::new();
        let by_nl = net.add_ns("nl");
        let by_nft = net.add_ns("ft");
        let apply = |ns: &str, s: &str| {
            let f = std::env::temp_dir().join(format!("{ns}.nft"));
            std::fs::write(&f, s).expect("write script");
            let ok = ns_ok(ns, &["nft", "-f", &f.to_string_lossy()]);
            let _ = std::fs::remove_file(&f);
            assert!(ok, "nft refused:\n{s}");
        };
        let (nl_file, _) = crate::host::open_netns(&net.ns_path(&by_nl)).expect("netns");
        let batch = |changes: Vec<nftnl::Change<'static>>| {
            crate::host::run_in_netns(&nl_file, move || {
                nftnl::apply(nftnl::FAMILY_BRIDGE, TABLE, &changes)
            })
            .expect("thread")
        };
        let list = |ns: &str| sorted(&ns_run(ns, &["nft", "list", "table", "bridge", "mesh"]));
        for ns in [&by_nl, &by_nft] {
            apply(ns, &table_script());
        }
        let a = port("vmesha", Some("0a:00:00:00:00:0a"), &["198.19.1.5/24"]);
        let b = port(
            "vmesh0a1b2c3d",
            Some("0a:58:c6:13:01:05"),
            &[
                "198.19.1.6/24",
                "198.19.2.7/24",
                "198.19.2.9/16",
                "10.1.2.3/32",
            ],
        );
        let b2 = port(
            "vmesh0a1b2c3d",
            Some("0a:58:c6:13:01:06"),
            &["198.19.3.7/25"],
        );
        let q = port("vmeshq", None, &["198.19.2.6/24"]);
        let steps: Vec<(Vec<Port>, Vec<String>)> = vec![
            (vec![a.clone(), q.clone()], vec!["0a:00:00:00:00:0a".into()]),
            (
                vec![a.clone(), b.clone(), q],
                vec![
                    "0a:00:00:00:00:0a".into(),
                    "0a:58:c6:13:01:05".into(),
                    "02:00:00:00:00:01".into(),
                ],
            ),
            (
                vec![b2.clone()],
                vec!["0a:58:c6:13:01:06".into(), "02:00:00:00:00:01".into()],
            ),
            (vec![b2, a], vec!["02:00:00:00:00:01".into()]),
            (vec![], vec![]),
        ];
        let mut held = Elements::default();
        for (i, (ports, local)) in steps.iter().enumerate() {
            let want = Elements::new(ports, local).expect("valid");
            batch(held.changes(&want).expect("keys")).unwrap_or_else(|e| panic!("step {i}: {e}"));
            apply(&by_nft, &want.script());
            assert_eq!(list(&by_nl), list(&by_nft), "step {i}");
            held = want;
        }
        // The sets are empty now: deleting a port's elements cannot apply,
        // and adding another's in the same batch is undone with it.
        let other = Elements::new(
            &[port(
                "vmeshz",
                Some("0a:00:00:00:00:0f"),
                &["198.19.8.8/24"],
            )],
            &[],
        )
        .expect("valid");
        let ghost = Elements::new(
            &[port(
                "vmeshg",
                Some("0a:00:00:00:00:0e"),
                &["198.19.9.9/24"],
            )],
            &[],
        )
        .expect("valid");
        let mut changes = ghost.changes(&Elements::default()).expect("keys");
        changes.extend(Elements::default().changes(&other).expect("keys"));
        let err = batch(changes).expect_err("deleting what is not there");
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{err}");
        assert_eq!(list(&by_nl), list(&by_nft));
        let now = list(&by_nl);
        assert!(!now.contains("vmeshz") && !now.contains("vmeshg"), "{now}");

        // The underlay table's set of fast-path peers, the same way.
        for ns in [&by_nl, &by_nft] {
            apply(ns, &underlay_script(6784));
        }
        let ul = |ns: &str| {
            sorted(&ns_run(
                ns,
                &["nft", "list", "set", "inet", UNDERLAY_TABLE, "peers"],
            ))
        };
        let mut held = BTreeSet::new();
        let ip = |s: &str| s.parse::<Ipv4Addr>().expect("ip");
        for peers in [
            vec![ip("198.18.0.2"), ip("198.18.0.3")],
            vec![ip("198.18.0.3"), ip("198.18.0.4"), ip("198.18.0.5")],
            vec![],
        ] {
            let want: BTreeSet<Ipv4Addr> = peers.iter().copied().collect();
            let key = |a: &Ipv4Addr| {
                Some(nftnl::Elem {
                    key: a.octets().to_vec(),
                    end: None,
                })
            };
            let c = set_changes([("peers", diff(&held, &want, key).expect("keys"))]);
            crate::host::run_in_netns(&nl_file, move || {
                nftnl::apply(nftnl::FAMILY_INET, UNDERLAY_TABLE, &c)
            })
            .expect("thread")
            .expect("applied");
            apply(&by_nft, &underlay_peers_script(&peers));
            assert_eq!(ul(&by_nl), ul(&by_nft), "{peers:?}");
            held = want;
        }
    }

    #[test]
    fn counters_parse_and_garbage_is_empty() {
        let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "bridge", "name": "spoofed", "table": "mesh", "handle": 3, "packets": 7, "bytes": 420}}, {"counter": {"family": "inet", "name": "mine", "table": "filter", "handle": 4, "packets": 9, "bytes": 1}}]}"#;
        let c = parse_counters(json);
        assert_eq!(c.get("spoofed"), Some(&7));
        assert_eq!(c.get("mine"), None, "a counter of another table");
        assert!(parse_counters(b"not json").is_empty());
        assert!(parse_counters(b"{}").is_empty());
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
        assert!(
            s.contains("iifname \"mesh\" oifname \"mesh\" ip daddr 198.19.2.0/24 ip saddr != 198.19.2.0/24 drop"),
            "{s}"
        );
        assert_eq!(
            nat_script("mesh", &[]),
            "table ip mesh\ndelete table ip mesh\n"
        );
    }
}
