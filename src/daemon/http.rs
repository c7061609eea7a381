//! The status listener: HTTP/1.1 on `127.0.0.1:6782` (`--metrics-addr`),
//! loopback only unless moved (DESIGN §4).
//!
//! - `GET /metrics`: Prometheus text ([`crate::metrics::render`]).
//! - `GET /status`: the same JSON as `mesh report`.
//! - `GET /ready`: 200 once containers can be attached (the address ring
//!   exists), else 503 with what it waits for. A ring that nobody asked
//!   for yet (consensus starts with the first allocation, or `mesh
//!   prime`) is not ready.
//! - `GET /topology.svg`: the mesh drawn by the daemon ([`page::svg`]).
//! - `GET /`: the status page ([`page::HTML`]), which polls `/status` and
//!   `/topology.svg`; no external assets.
//!
//! Every answer is made from a fresh status asked of the router, as the
//! control socket answers `mesh report`: nothing here keeps state. One
//! request per connection (`Connection: close`), a head of at most
//! [`MAX_HEAD`] bytes read within [`HEAD_TIMEOUT`], at most
//! [`MAX_CONNECTIONS`] at once; anything else gets a 4xx and the listener
//! goes on. The head is parsed by the Docker proxy's [`Head`] parser.

pub mod page;

use super::report;
use crate::api::Status;
use crate::datapath::fastdp;
use crate::host::{self, TAP};
use crate::integrations::proxy::{Head, HeadFinder};
use crate::metrics;
use crate::router::{self, connmaker};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

/// The largest request head read.
pub const MAX_HEAD: usize = 16 * 1024;
/// How long a client may take to send its head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 32;

/// What the listener reads from besides the router.
pub struct Sources {
    /// The router, for the status.
    pub router: mpsc::Sender<router::Cmd>,
    /// The connection maker, for the report's targets.
    pub connmaker: mpsc::Sender<connmaker::Cmd>,
    /// For the kernel's counters of the TAP and the VXLAN device.
    pub netlink: host::Netlink,
    /// The DNS zone, for its query counters.
    pub zone: Option<Arc<mesh_dns::Zone>>,
}

/// Bind the listener; the error names the address and the flag.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics and status on {addr} (--metrics-addr)"))
}

/// Serve until the daemon stops.
pub async fn serve(listener: TcpListener, sources: Sources) {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "metrics and status page on http://{a}/");
    }
    let sources = Arc::new(sources);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("metrics listener accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(stream, &sources).await {
                debug!("metrics listener client: {e:#}");
            }
        });
    }
}

/// An answer: status code, content type, body.
struct Answer {
    code: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Answer {
    fn text(code: u16, body: impl Into<String>) -> Answer {
        Answer {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }

    /// The bytes on the wire; a HEAD request gets the head only.
    fn emit(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.code {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.code,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Read one request head and answer it.
async fn connection(mut s: TcpStream, sources: &Sources) -> anyhow::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut finder = HeadFinder::default();
    let mut chunk = [0u8; 2048];
    let end = loop {
        if let Some(end) = finder.find(&buf) {
            break Some(end);
        }
        if buf.len() > MAX_HEAD {
            break None;
        }
        let n = tokio::time::timeout(HEAD_TIMEOUT, s.read(&mut chunk))
            .await
            .context("timed out reading the request")??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (answer, head_only) = match end {
        None => (Answer::text(431, "request head too long\n"), false),
        Some(end) => match Head::parse(&buf[..end]) {
            Err(e) => (Answer::text(400, format!("{e}\n")), false),
            Ok(head) => {
                let head_only = head.first == "HEAD";
                (route(&head, sources).await, head_only)
            }
        },
    };
    s.write_all(&answer.emit(head_only)).await?;
    s.shutdown().await?;
    Ok(())
}

/// The path of a request target, without its query.
fn path_of(target: &str) -> &str {
    target.split(['?', '#']).next().unwrap_or("")
}

async fn route(head: &Head, sources: &Sources) -> Answer {
    if head.first != "GET" && head.first != "HEAD" {
        return Answer::text(405, "only GET and HEAD\n");
    }
    let path = path_of(&head.second);
    if path == "/" {
        return Answer {
            code: 200,
            content_type: "text/html; charset=utf-8",
            body: page::HTML.as_bytes().to_vec(),
        };
    }
    if !matches!(path, "/status" | "/metrics" | "/ready" | "/topology.svg") {
        return Answer::text(
            404,
            "not found: try /, /status, /metrics, /ready, /topology.svg\n",
        );
    }
    // The picture and readiness need only the router's part of the
    // status; the rest (the nftables counters, one `nft` run)
    // only for the report and the metrics.
    let status = if matches!(path, "/ready" | "/topology.svg") {
        report::router_part(&sources.router).await
    } else {
        report::full(&sources.router, &sources.connmaker).await
    };
    let Some(status) = status else {
        return Answer::text(503, "the daemon is shutting down\n");
    };
    match path {
        "/status" => match serde_json::to_vec_pretty(&status) {
            Ok(body) => Answer {
                code: 200,
                content_type: "application/json",
                body,
            },
            Err(e) => Answer::text(503, format!("{e}\n")),
        },
        "/ready" => ready(&status),
        "/topology.svg" => Answer {
            code: 200,
            content_type: "image/svg+xml",
            body: page::svg(&status).into_bytes(),
        },
        _ => {
            let extra = extra(sources).await;
            Answer {
                code: 200,
                content_type: metrics::CONTENT_TYPE,
                body: metrics::render(&status, &extra).into_bytes(),
            }
        }
    }
}

/// `/ready`: 200 once the ring exists, else 503 and why.
fn ready(status: &Status) -> Answer {
    match &status.ipam {
        Some(ipam) if ipam.state == "ready" => Answer::text(200, "ready\n"),
        // Allocating, but owners are missing: said, still ready.
        Some(ipam) if ipam.state.starts_with("ready") => {
            Answer::text(200, format!("ready; IPAM {}\n", ipam.state))
        }
        Some(ipam) => {
            let mut body = format!("not ready: IPAM {}", ipam.state);
            if ipam.state.contains("first allocation") {
                body.push_str(" (`mesh prime` starts it now)");
            }
            body.push('\n');
            for p in &ipam.pending {
                body.push_str(&format!("waiting: {p}\n"));
            }
            Answer::text(503, body)
        }
        None => Answer::text(503, "not ready: no address allocator\n"),
    }
}

/// The kernel's counters of the overlays' devices and the DNS server's.
async fn extra(sources: &Sources) -> metrics::Extra {
    let mut devices = Vec::new();
    for (overlay, dev) in [("sleeve", TAP), ("fastdp", fastdp::DEVICE)] {
        match sources.netlink.counters(dev).await {
            Ok(Some(c)) => devices.push((overlay, c)),
            Ok(None) => {}
            Err(e) => debug!("counters of {dev}: {e}"),
        }
    }
    metrics::Extra {
        devices,
        dns: sources.zone.as_ref().map(|z| {
            let c = z.counts();
            metrics::DnsCounters {
                answered: c.answered,
                not_found: c.not_found,
                forwarded: c.forwarded,
                failed: c.failed,
                dropped: c.dropped,
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_lose_their_query() {
        assert_eq!(path_of("/metrics?x=1"), "/metrics");
        assert_eq!(path_of("/#a"), "/");
        assert_eq!(path_of("/status"), "/status");
    }

    #[test]
    fn answers_say_their_length_and_close() {
        let a = Answer::text(503, "not ready\n").emit(false);
        let text = String::from_utf8(a).unwrap_or_default();
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 10\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nnot ready\n"), "{text}");
        let head = String::from_utf8(Answer::text(200, "x").emit(true)).unwrap_or_default();
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }
}
