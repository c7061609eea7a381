//! The local peer: the facts about this peer that the daemon's tasks share
//! (identity, password key, port, MTU, fast path), and how a peer's address
//! is written. A leaf: it imports no other module of the daemon.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// Shared, read-only facts about this peer handed to the tasks.
pub struct Me {
    /// Identity: signs what we gossip.
    pub id: mesh_proto::sign::Identity,
    /// The Noise key derived from it.
    pub key: mesh_proto::handshake::StaticKey,
    /// Peer name.
    pub name: mesh_proto::name::PeerName,
    /// Nickname.
    pub nickname: String,
    /// Pre-shared key from the password.
    pub psk: Option<[u8; 32]>,
    /// TCP/UDP port.
    pub port: u16,
    /// Overlay MTU.
    pub mtu: u32,
    /// The fast path, unless `--no-fastdp` (or its device failed).
    pub fastdp: Option<FastdpLocal>,
    /// `--trusted-subnets`: with a password, the fast path is still offered
    /// to peers in these.
    pub trusted: Vec<ipnet::Ipv4Net>,
    /// When a sleeve key is replaced (with a password).
    pub rekey: mesh_proto::rekey::Policy,
}

/// This host's fast path, as the control connections need it.
#[derive(Debug, Clone)]
pub struct FastdpLocal {
    /// VNI of our device.
    pub vni: u32,
    /// Our VXLAN port.
    pub port: u16,
    /// Our bridge's MAC.
    pub mac: [u8; 6],
}

/// Parse `HOST` or `HOST:PORT` into a socket address.
pub fn parse_peer(s: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    let with_port = if s.contains(':') {
        s.to_string()
    } else {
        format!("{s}:{default_port}")
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.find(|a| a.is_ipv4()))
        .ok_or_else(|| {
            format!(
                "invalid peer {s:?}: expected an IP address or host name, optionally with :PORT"
            )
        })
}
