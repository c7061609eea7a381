//! The socket loops: UDP (the hot path) and TCP, over sockets the caller
//! bound (the daemon binds them inside container namespaces).
//!
//! UDP is one task reading datagrams until the socket would block, answering
//! each from the task's snapshot view with one reused buffer and sending the
//! answer at once; only forwarded queries leave the loop, each in its own
//! task bounded by the upstream timeout and counted against
//! `max_forwards`. TCP is one task per connection (at most
//! `max_tcp_connections`), closed when idle, on garbage, or when the
//! server future is dropped.

use crate::answer::{self, Outcome, Rng, Transport, SERVFAIL};
use crate::upstream;
use crate::zone::{View, Zone};
use crate::{random_u64, Error};
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

/// Datagrams handled before the loop yields to other tasks.
const BATCH: usize = 128;
/// Largest query datagram read (longer ones arrive cut and get FORMERR).
const MAX_QUERY: usize = 4096;

/// Serve UDP and TCP until an unrecoverable socket error. Both sockets must
/// already be bound (and the listener listening); they are switched to
/// non-blocking here. Dropping the future stops the server: its TCP
/// connections and forwarded queries in flight end with it, and no task
/// keeps a socket open afterwards.
pub async fn serve(
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    zone: Arc<Zone>,
) -> Result<(), Error> {
    tokio::try_join!(serve_udp(udp, zone.clone()), serve_tcp(tcp, zone))?;
    Ok(())
}

fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::Interrupted
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
    )
}

/// Serve UDP only (see [`serve`]).
pub async fn serve_udp(udp: std::net::UdpSocket, zone: Arc<Zone>) -> Result<(), Error> {
    serve_udp_paced(udp, zone, None).await
}

/// [`serve`] with UDP queries answered at most `max_qps` per second (a
/// container's server: a flood from one container then costs a bounded
/// share of the daemon's CPU, and the kernel drops the excess).
pub async fn serve_paced(
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    zone: Arc<Zone>,
    max_qps: u32,
) -> Result<(), Error> {
    tokio::try_join!(
        serve_udp_paced(udp, zone.clone(), Some(max_qps.max(1))),
        serve_tcp(tcp, zone)
    )?;
    Ok(())
}

/// Paces a loop to `rate` items per second, in slices of 10 ms.
struct Pace {
    per_slice: u32,
    left: u32,
    slice_end: Instant,
}

impl Pace {
    const SLICE: Duration = Duration::from_millis(10);

    fn new(rate: u32) -> Pace {
        let per_slice = (rate / 100).max(1);
        Pace {
            per_slice,
            left: per_slice,
            slice_end: Instant::now() + Self::SLICE,
        }
    }

    /// Take one; sleeps to the next slice when this one is used up.
    async fn take(&mut self) {
        if self.left == 0 {
            let now = Instant::now();
            if now < self.slice_end {
                tokio::time::sleep_until(self.slice_end.into()).await;
            }
            self.slice_end = Instant::now() + Self::SLICE;
            self.left = self.per_slice;
        }
        self.left -= 1;
    }
}

async fn serve_udp_paced(
    udp: std::net::UdpSocket,
    zone: Arc<Zone>,
    rate: Option<u32>,
) -> Result<(), Error> {
    let mut pace = rate.map(Pace::new);
    udp.set_nonblocking(true)?;
    let sock = Arc::new(UdpSocket::from_std(udp)?);
    let local = sock.local_addr().ok();
    let forwards = Arc::new(Semaphore::new(zone.config().max_forwards));
    let mut view = View::new(&zone);
    let mut rng = Rng::new(random_u64());
    let mut buf = vec![0u8; MAX_QUERY];
    let mut out = Vec::with_capacity(MAX_QUERY);
    // Dropped with this future: forwards in flight end with it and release
    // the socket at once.
    let (_stop, stopped) = watch::channel(());
    loop {
        sock.readable().await?;
        let mut handled = 0;
        while handled < BATCH {
            let (n, from) = match sock.try_recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            handled += 1;
            if let Some(p) = pace.as_mut() {
                p.take().await;
            }
            view.refresh(&zone);
            let query = &buf[..n];
            let outcome = answer::respond(&view.snap, query, Transport::Udp, &mut out, &mut rng);
            zone.count(outcome, &out);
            match outcome {
                Outcome::Reply => send(&sock, &out, from).await,
                Outcome::Drop => {}
                Outcome::Forward => {
                    let servers = upstreams(&zone, local);
                    let permit = forwards.clone().try_acquire_owned();
                    match permit {
                        Ok(permit) if !servers.is_empty() => {
                            let q = query.to_vec();
                            let sock = sock.clone();
                            let deadline = Instant::now() + zone.config().upstream_timeout;
                            let mut stopped = stopped.clone();
                            let zone = zone.clone();
                            tokio::spawn(async move {
                                let _permit = permit;
                                let mut out = Vec::new();
                                let answer = tokio::select! {
                                    _ = stopped.changed() => return,
                                    a = upstream::forward_udp(&q, &servers, deadline) => a,
                                };
                                match answer {
                                    Some(a) if a.len() <= answer::udp_limit(&q) => {
                                        send(&sock, &a, from).await
                                    }
                                    Some(_) => {
                                        if answer::truncated_reply(&q, &mut out) {
                                            send(&sock, &out, from).await
                                        }
                                    }
                                    None => {
                                        zone.count_failed();
                                        if answer::error_reply(&q, SERVFAIL, &mut out) {
                                            send(&sock, &out, from).await
                                        }
                                    }
                                }
                            });
                        }
                        _ => {
                            zone.count_failed();
                            if answer::error_reply(query, SERVFAIL, &mut out) {
                                send(&sock, &out, from).await
                            }
                        }
                    }
                }
            }
        }
        if handled == BATCH {
            tokio::task::yield_now().await;
        }
    }
}

/// The upstream servers, less the server's own address (no loops).
fn upstreams(zone: &Zone, local: Option<SocketAddr>) -> Arc<[SocketAddr]> {
    let all = zone.upstreams.current();
    match local {
        Some(l) if all.contains(&l) => all.iter().copied().filter(|s| *s != l).collect(),
        _ => all,
    }
}

async fn send(sock: &UdpSocket, bytes: &[u8], to: SocketAddr) {
    match sock.try_send_to(bytes, to) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            let _ = sock.send_to(bytes, to).await;
        }
        Err(e) => tracing::trace!(%to, error = %e, "DNS answer not sent"),
    }
}

/// Serve TCP only (see [`serve`]).
pub async fn serve_tcp(tcp: std::net::TcpListener, zone: Arc<Zone>) -> Result<(), Error> {
    tcp.set_nonblocking(true)?;
    let listener = TcpListener::from_std(tcp)?;
    let local = listener.local_addr().ok();
    let conns = Arc::new(Semaphore::new(zone.config().max_tcp_connections));
    // Dropped with this future: every connection task sees it and ends.
    let (_stop, stopped) = watch::channel(());
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            continue;
        };
        let zone = zone.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stopped.changed() => {}
                r = connection(stream, zone, local) => {
                    if let Err(e) = r {
                        tracing::trace!(error = %e, "DNS TCP connection ended");
                    }
                }
            }
        });
    }
}

async fn connection(
    mut s: TcpStream,
    zone: Arc<Zone>,
    local: Option<SocketAddr>,
) -> io::Result<()> {
    s.set_nodelay(true)?;
    let idle = zone.config().tcp_idle;
    let mut rng = Rng::new(random_u64());
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut msg = Vec::new();
    let timed_out = || io::Error::new(ErrorKind::TimedOut, "idle");
    loop {
        let len = match tokio::time::timeout(idle, s.read_u16()).await {
            Ok(Ok(len)) => len as usize,
            Ok(Err(e)) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        if len < 12 {
            return Ok(());
        }
        buf.resize(len, 0);
        tokio::time::timeout(idle, s.read_exact(&mut buf))
            .await
            .map_err(|_| timed_out())??;
        let snap = zone.snapshot();
        let outcome = answer::respond(&snap, &buf, Transport::Tcp, &mut out, &mut rng);
        zone.count(outcome, &out);
        match outcome {
            Outcome::Reply => {}
            Outcome::Drop => return Ok(()),
            Outcome::Forward => {
                let servers = upstreams(&zone, local);
                let deadline = Instant::now() + zone.config().upstream_timeout;
                // Over TCP first; servers that only speak UDP are asked
                // again over UDP in what is left of the bound.
                let answer = match upstream::forward_tcp(&buf, &servers, deadline).await {
                    Some(a) => Some(a),
                    None => upstream::forward_udp(&buf, &servers, deadline).await,
                };
                match answer {
                    Some(a) => out = a,
                    None => {
                        zone.count_failed();
                        answer::error_reply(&buf, SERVFAIL, &mut out);
                    }
                }
            }
        }
        msg.clear();
        msg.extend_from_slice(&(out.len().min(65535) as u16).to_be_bytes());
        msg.extend_from_slice(&out[..out.len().min(65535)]);
        s.write_all(&msg).await?;
    }
}
