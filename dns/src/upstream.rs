//! Upstream servers: the list from resolv.conf, and forwarding one query.
//!
//! The list is re-read when the file's modification time, size or inode
//! changes (checked on each forwarded query: a `stat`, on a path that is
//! already slower than our own answers). A query is forwarded as it came,
//! with a fresh random id, from a new connected socket, so that only the
//! server asked can answer it; the servers are tried in turn, each with an
//! equal share of what is left of the bound, and the whole attempt never
//! outlives the bound.
//!
//! Sockets for upstream traffic are opened by the task that forwards, that
//! is in the daemon's own network namespace even when the listening sockets
//! live in a container's: the host's resolv.conf servers are reachable from
//! there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// The `nameserver` addresses of a resolv.conf text (port 53 unless the
/// address carries one, an extension of ours), in order, at most 8.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(w) = words.next() else { continue };
        // Drop an IPv6 zone (fe80::1%eth0): not reachable from elsewhere.
        let addr = w
            .parse::<SocketAddr>()
            .ok()
            .or_else(|| w.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
        if let Some(a) = addr {
            if !out.contains(&a) && out.len() < 8 {
                out.push(a);
            }
        }
    }
    out
}

#[derive(Debug, Default)]
struct Cache {
    stamp: Option<(SystemTime, u64, u64)>,
    servers: Arc<[SocketAddr]>,
}

/// The upstream list of one resolv.conf path.
#[derive(Debug)]
pub(crate) struct Upstreams {
    path: PathBuf,
    cache: Mutex<Cache>,
}

impl Upstreams {
    pub(crate) fn new(path: PathBuf) -> Upstreams {
        Upstreams {
            path,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The current servers (re-reading the file if it changed).
    pub(crate) fn current(&self) -> Arc<[SocketAddr]> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.path).ok();
        let stamp = meta.and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())));
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if stamp != c.stamp || stamp.is_none() {
            let servers = match std::fs::read_to_string(&self.path) {
                Ok(text) => parse_resolv_conf(&text),
                Err(e) => {
                    if c.stamp.is_some() || !c.servers.is_empty() {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot read resolv.conf; no upstream servers");
                    }
                    Vec::new()
                }
            };
            if stamp.is_some() && &*c.servers != servers.as_slice() {
                tracing::info!(path = %self.path.display(), servers = ?servers, "upstream DNS servers");
            }
            c.servers = servers.into();
            c.stamp = stamp;
        }
        c.servers.clone()
    }
}

/// Forward `query` over UDP; the answer with the client's id restored, or
/// `None` when every server failed or `deadline` passed.
pub(crate) async fn forward_udp(
    query: &[u8],
    servers: &[SocketAddr],
    deadline: Instant,
) -> Option<Vec<u8>> {
    forward(query, servers, deadline, false).await
}

/// Forward `query` over TCP (for clients that came by TCP).
pub(crate) async fn forward_tcp(
    query: &[u8],
    servers: &[SocketAddr],
    deadline: Instant,
) -> Option<Vec<u8>> {
    forward(query, servers, deadline, true).await
}

async fn forward(
    query: &[u8],
    servers: &[SocketAddr],
    deadline: Instant,
    tcp: bool,
) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    for (i, &server) in servers.iter().enumerate() {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let share = (deadline - now) / (servers.len() - i) as u32;
        let id = (crate::random_u64() & 0xffff) as u16;
        let mut q = query.to_vec();
        q[..2].copy_from_slice(&id.to_be_bytes());
        let attempt = async {
            if tcp {
                ask_tcp(&q, server, id).await
            } else {
                ask_udp(&q, server, id).await
            }
        };
        match tokio::time::timeout(share, attempt).await {
            Ok(Ok(mut answer)) => {
                answer[..2].copy_from_slice(&query[..2]);
                return Some(answer);
            }
            Ok(Err(e)) => tracing::debug!(%server, error = %e, "upstream failed"),
            Err(_) => tracing::debug!(%server, "upstream timed out"),
        }
    }
    None
}

fn unspecified(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        SocketAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    }
}

fn is_answer(b: &[u8], id: u16) -> bool {
    b.len() >= 12 && b[..2] == id.to_be_bytes() && b[2] & 0x80 != 0
}

async fn ask_udp(q: &[u8], server: SocketAddr, id: u16) -> std::io::Result<Vec<u8>> {
    let sock = UdpSocket::bind(unspecified(server)).await?;
    sock.connect(server).await?;
    sock.send(q).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if is_answer(&buf[..n], id) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn ask_tcp(q: &[u8], server: SocketAddr, id: u16) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(server).await?;
    s.set_nodelay(true)?;
    let mut msg = Vec::with_capacity(q.len() + 2);
    msg.extend_from_slice(&(q.len() as u16).to_be_bytes());
    msg.extend_from_slice(q);
    s.write_all(&msg).await?;
    loop {
        let len = s.read_u16().await? as usize;
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).await?;
        if is_answer(&buf, id) {
            return Ok(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# comment\nsearch x\nnameserver 127.0.0.1\nnameserver ::1\n\
                    nameserver 127.0.0.1:5353\nnameserver bogus\nnameserver 127.0.0.1\noptions ndots:1\n";
        let v = parse_resolv_conf(text);
        assert_eq!(
            v,
            vec![
                "127.0.0.1:53".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
                "127.0.0.1:5353".parse().unwrap(),
            ]
        );
    }
}
