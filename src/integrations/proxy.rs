//! The Docker API proxy (`mesh env`, DESIGN §7): a unix socket,
//! `$MESH_RUN_DIR/docker.sock`, in front of the Docker daemon's
//! (`--docker-host`). Every request is forwarded as it came, one request per
//! connection (the proxy rewrites `Connection` to `close`, so the client
//! opens a new connection for the next one); a few are looked at on the way:
//!
//! - `POST /containers/create`: unless the container uses the host's network
//!   or says `WEAVE_CIDR=none`/`MESH_CIDR=none`, its DNS server becomes the
//!   mesh's (`127.0.0.11`), its search domain the mesh domain, and, when the
//!   request names the container and gives no hostname, its hostname the
//!   name in the mesh domain; anything the user set is kept.
//! - `POST /containers/{id}/start` (and `/restart`): when the daemon answers 2xx, the
//!   container is attached by PID with the addresses of its
//!   `MESH_CIDR`/`WEAVE_CIDR` (default `net:default`) before the client sees
//!   the answer, so `docker run -d` returns with the container on the mesh.
//! - `DELETE /containers/{id}`, `POST /containers/{id}/kill|stop`: after a
//!   2xx (and, for kill/stop, once the container no longer runs, or is
//!   gone: `--rm`) the container is detached and its addresses released
//!   at once. Containers that exit on their own are released by the
//!   attachment manager's check for vanished interfaces (every 5 s).
//! - Upgraded connections (attach, exec start) are copied both ways until
//!   both sides close.
//!
//! The socket is root's, mode 0600; with `mesh launch --proxy-group NAME`
//! that group's too, mode 0660 (as Docker's own socket is the `docker`
//! group's).
//!
//! The parsing (request heads, chunked bodies, the create body's rewrite)
//! is pure and unit-tested; the driver owns the sockets. A malformed request
//! gets a 400, an unreachable upstream a 502, each with Docker's JSON
//! `{"message": ...}`; the proxy goes on either way.

use crate::api::{self, Request, Response};
use crate::attach::addr;
use crate::attach::DNS_ADDR;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, info, warn};

/// The largest request or response head accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// The largest body the proxy reads (create bodies, inspect answers).
pub const MAX_BODY: usize = 8 << 20;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a call to the mesh daemon's control socket may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest chunk-size line (extensions included, CRLF not) is one
/// byte shorter.
const MAX_CHUNK_LINE: usize = 1024;

/// Why a request could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    /// The head is longer than [`MAX_HEAD`].
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    /// The body is longer than [`MAX_BODY`].
    #[error("body longer than {MAX_BODY} bytes")]
    BodyTooLong,
    /// Not HTTP/1.x as expected.
    #[error("malformed HTTP: {0}")]
    Malformed(String),
    /// The body is not the JSON expected.
    #[error("malformed JSON body: {0}")]
    Json(String),
}

/// A request or response head: the start line's three parts and the
/// header fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method (request) or version (response).
    pub first: String,
    /// Target (request) or status code (response).
    pub second: String,
    /// Version (request) or reason (response).
    pub third: String,
    /// Header fields, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Parse a head, `buf` ending with (or without) the blank line.
    pub fn parse(buf: &[u8]) -> Result<Head, ParseError> {
        let text = std::str::from_utf8(buf)
            .map_err(|_| ParseError::Malformed("head is not UTF-8".into()))?;
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or("");
        let mut parts = start.splitn(3, ' ');
        let first = parts.next().unwrap_or("").to_string();
        let second = parts.next().unwrap_or("").to_string();
        let third = parts.next().unwrap_or("").to_string();
        if first.is_empty() || second.is_empty() {
            return Err(ParseError::Malformed(format!("start line {start:?}")));
        }
        let mut headers = Vec::new();
        for line in lines {
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| ParseError::Malformed(format!("header line {line:?}")))?;
            if k.is_empty() || k.contains(' ') {
                return Err(ParseError::Malformed(format!("header name {k:?}")));
            }
            headers.push((k.to_string(), v.trim().to_string()));
        }
        Ok(Head {
            first,
            second,
            third,
            headers,
        })
    }

    /// A header's value (the first of that name).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Replace every header of that name by one with `value`.
    pub fn set(&mut self, name: &str, value: &str) {
        self.remove(name);
        self.headers.push((name.to_string(), value.to_string()));
    }

    /// Remove every header of that name.
    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
    }

    /// Whether a comma-separated header lists `token`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    /// The client asks to upgrade the connection (attach, exec start).
    pub fn is_upgrade(&self) -> bool {
        self.get("Upgrade").is_some() || self.has_token("Connection", "upgrade")
    }

    /// The body is chunked.
    pub fn is_chunked(&self) -> bool {
        self.has_token("Transfer-Encoding", "chunked")
    }

    /// The `Content-Length`, if given and valid.
    pub fn content_length(&self) -> Result<Option<usize>, ParseError> {
        match self.get("Content-Length") {
            None => Ok(None),
            Some(v) => v
                .parse::<usize>()
                .map(Some)
                .map_err(|_| ParseError::Malformed(format!("Content-Length {v:?}"))),
        }
    }

    /// A response's status code (0 if unreadable).
    pub fn status(&self) -> u16 {
        self.second.parse().unwrap_or(0)
    }

    /// The head as sent on the wire, blank line included.
    pub fn emit(&self) -> Vec<u8> {
        let mut out = format!("{} {} {}\r\n", self.first, self.second, self.third);
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Where the head ends in `buf`: the index just past `\r\n\r\n`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    HeadFinder::default().find(buf)
}

/// [`head_end`] for a buffer that grows as bytes arrive: each
/// [`HeadFinder::find`] looks only at the bytes that came since the last
/// (and the three before them, where a `\r\n\r\n` may have begun), so
/// reading a head byte by byte takes time linear in its length, not
/// quadratic.
#[derive(Debug, Default, Clone)]
pub struct HeadFinder {
    /// Where the next search starts.
    from: usize,
    /// Bytes looked at so far (what tests of linear time count).
    scanned: u64,
}

impl HeadFinder {
    /// Where the head ends in `buf` (the same buffer as before, grown at
    /// its end): the index just past `\r\n\r\n`.
    pub fn find(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.from.min(buf.len());
        let window = &buf[from..];
        self.scanned += window.len() as u64;
        match window.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => Some(from + i + 4),
            None => {
                self.from = buf.len().saturating_sub(3);
                None
            }
        }
    }

    /// Bytes looked at so far, over every call.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }
}

/// Decode a chunked body from the start of `buf`: `Ok(None)` while it is
/// incomplete, else the body and how many bytes of `buf` it took (trailers
/// included).
pub fn dechunk(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, ParseError> {
    let mut d = Dechunker::default();
    Ok(d.poll(buf)?.map(|used| (d.into_body(), used)))
}

/// Where a [`Dechunker`] is in the body.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Before a chunk's bytes (and their CRLF).
    Data(usize),
    /// After the last chunk: trailer lines, then an empty line.
    Trailers,
    /// The whole body took this many bytes.
    Done(usize),
}

/// [`dechunk`] for a buffer that grows as bytes arrive: it remembers how
/// far it has decoded, so each [`Dechunker::poll`] looks only at bytes not
/// looked at before (and one more, where a CRLF may have begun). Reading
/// a body byte by byte takes time linear in its length; calling
/// [`dechunk`] on the whole buffer after every read took quadratic time.
#[derive(Debug, Default, Clone)]
pub struct Dechunker {
    body: Vec<u8>,
    /// Bytes of the buffer decoded (the start of the current step).
    at: usize,
    /// Where the search for the next CRLF resumes (at least `at`).
    scan: usize,
    state: ChunkState,
    /// Bytes looked at so far (what tests of linear time count).
    scanned: u64,
}

impl Dechunker {
    /// Decode on from where the last call stopped. `buf` must be the
    /// buffer of the previous calls, grown at its end. `Ok(None)` while
    /// the body is incomplete, else how many bytes of `buf` it took
    /// (trailers included); the body is then [`Dechunker::into_body`].
    pub fn poll(&mut self, buf: &[u8]) -> Result<Option<usize>, ParseError> {
        loop {
            match self.state {
                ChunkState::Done(used) => return Ok(Some(used)),
                ChunkState::Size => {
                    let Some(eol) = self.find_crlf(buf) else {
                        if buf.len() - self.at > MAX_CHUNK_LINE {
                            return Err(ParseError::Malformed("chunk size line too long".into()));
                        }
                        return Ok(None);
                    };
                    // The same limit when the CRLF is there: whether a
                    // line is refused must not depend on how its bytes
                    // arrived (with the CRLF at once or not).
                    if eol - self.at >= MAX_CHUNK_LINE {
                        return Err(ParseError::Malformed("chunk size line too long".into()));
                    }
                    let line = std::str::from_utf8(&buf[self.at..eol])
                        .map_err(|_| ParseError::Malformed("chunk size is not text".into()))?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16)
                        .map_err(|_| ParseError::Malformed(format!("chunk size {hex:?}")))?;
                    self.advance(eol + 2);
                    if size == 0 {
                        self.state = ChunkState::Trailers;
                        continue;
                    }
                    if self.body.len().saturating_add(size) > MAX_BODY {
                        return Err(ParseError::BodyTooLong);
                    }
                    self.state = ChunkState::Data(size);
                }
                ChunkState::Data(size) => {
                    // `size` is at most MAX_BODY: no overflow.
                    let end = self.at + size;
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    self.scanned += size as u64 + 2;
                    self.body.extend_from_slice(&buf[self.at..end]);
                    if &buf[end..end + 2] != b"\r\n" {
                        return Err(ParseError::Malformed("chunk not followed by CRLF".into()));
                    }
                    self.advance(end + 2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    // Trailers, each ending with CRLF, then an empty line.
                    let Some(eol) = self.find_crlf(buf) else {
                        return Ok(None);
                    };
                    let empty = eol == self.at;
                    self.advance(eol + 2);
                    if empty {
                        self.state = ChunkState::Done(self.at);
                    }
                }
            }
        }
    }

    /// The decoded body (all of it once [`Dechunker::poll`] said so).
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// Bytes looked at so far, over every call.
    pub fn scanned(&self) -> u64 {
        self.scanned
    }

    fn advance(&mut self, to: usize) {
        self.at = to;
        self.scan = to;
    }

    /// The index in `buf` of the next CRLF at or after `at`, resuming the
    /// search where the last one gave up.
    fn find_crlf(&mut self, buf: &[u8]) -> Option<usize> {
        let from = self.scan.max(self.at).min(buf.len());
        let window = &buf[from..];
        self.scanned += window.len() as u64;
        match window.windows(2).position(|w| w == b"\r\n") {
            Some(i) => Some(from + i),
            None => {
                self.scan = buf.len().saturating_sub(1).max(self.at);
                None
            }
        }
    }
}

/// What the proxy does with a request, from its method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `POST /containers/create`, with the `name` query parameter.
    Create {
        /// The container's name, if the request gives one.
        name: Option<String>,
    },
    /// `POST /containers/{id}/start` or `/restart`.
    Start(String),
    /// `DELETE /containers/{id}`.
    Delete(String),
    /// `POST /containers/{id}/kill` or `/stop`.
    Stop(String),
    /// Anything else: forwarded untouched.
    Other,
}

impl Route {
    /// Route a request by method and target (`/v1.41/containers/create?name=x`).
    pub fn of(method: &str, target: &str) -> Route {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if segs.first().is_some_and(|s| is_version(s)) {
            segs.remove(0);
        }
        match (method, segs.as_slice()) {
            ("POST", ["containers", "create"]) => Route::Create {
                name: query_param(query, "name").filter(|n| !n.is_empty()),
            },
            ("POST", ["containers", id, "start" | "restart"]) => Route::Start(decode(id)),
            ("POST", ["containers", id, "kill" | "stop"]) => Route::Stop(decode(id)),
            ("DELETE", ["containers", id]) => Route::Delete(decode(id)),
            _ => Route::Other,
        }
    }
}

/// `v1.41`, `v1`.
fn is_version(s: &str) -> bool {
    s.strip_prefix('v').is_some_and(|v| {
        !v.is_empty()
            && v.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| decode(v))
    })
}

/// Percent-decoding (and `+` as space) of a path segment or query value.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len()
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                out.push(hex_value(b[i + 1]) * 16 + hex_value(b[i + 2]));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(h: u8) -> u8 {
    match h {
        b'0'..=b'9' => h - b'0',
        b'a'..=b'f' => h - b'a' + 10,
        b'A'..=b'F' => h - b'A' + 10,
        _ => 0,
    }
}

/// Percent-encoding of a path segment.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The CIDR variable (`MESH_CIDR` wins over `WEAVE_CIDR`) from a Docker
/// `Env` list.
pub fn cidr_env(env: Option<&Value>) -> Option<String> {
    let list = env?.as_array()?;
    let environ: Vec<u8> = list
        .iter()
        .filter_map(Value::as_str)
        .flat_map(|kv| kv.bytes().chain(std::iter::once(0)))
        .collect();
    addr::from_environ(&environ)
}

/// Rewrite a create body for the mesh: `Dns` and `DnsSearch` (and, given a
/// container name and no hostname, `Hostname` and `Domainname`). `domain`
/// is the mesh domain without its final dot (`None` when the daemon serves
/// no DNS). Returns `None` when the container is not for the mesh (host
/// network, `none` CIDR) or nothing changes.
pub fn rewrite_create(
    body: &[u8],
    domain: Option<&str>,
    name: Option<&str>,
) -> Result<Option<Vec<u8>>, ParseError> {
    let mut v: Value = serde_json::from_slice(body).map_err(|e| ParseError::Json(e.to_string()))?;
    let Some(obj) = v.as_object_mut() else {
        return Err(ParseError::Json("the body is not a JSON object".into()));
    };
    let cidr = cidr_env(obj.get("Env"));
    if addr::addrs_or_default(cidr.as_deref()).is_ok_and(|a| addr::all_none(&a)) {
        return Ok(None);
    }
    let host_config = obj
        .entry("HostConfig")
        .or_insert_with(|| Value::Object(Default::default()));
    if host_config.is_null() {
        *host_config = Value::Object(Default::default());
    }
    let Some(hc) = host_config.as_object_mut() else {
        return Err(ParseError::Json("HostConfig is not an object".into()));
    };
    if shares_netns(hc.get("NetworkMode")) {
        return Ok(None);
    }
    let Some(domain) = domain else {
        return Ok(None);
    };
    let empty = |v: Option<&Value>| match v {
        None | Some(Value::Null) => true,
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::String(s)) => s.is_empty(),
        Some(_) => false,
    };
    let mut changed = false;
    if empty(hc.get("Dns")) {
        hc.insert("Dns".into(), json!([DNS_ADDR.ip().to_string()]));
        changed = true;
    }
    if empty(hc.get("DnsSearch")) && !domain.is_empty() {
        hc.insert("DnsSearch".into(), json!([domain]));
        changed = true;
    }
    if let Some(name) = name {
        let name = name.trim_start_matches('/');
        let label_ok = !name.is_empty()
            && name.len() <= 63
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if label_ok && empty(obj.get("Hostname")) {
            obj.insert("Hostname".into(), json!(name));
            if empty(obj.get("Domainname")) && !domain.is_empty() {
                obj.insert("Domainname".into(), json!(domain));
            }
            changed = true;
        }
    }
    if !changed {
        return Ok(None);
    }
    serde_json::to_vec(&v)
        .map(Some)
        .map_err(|e| ParseError::Json(e.to_string()))
}

/// What `docker inspect` tells the proxy about a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspected {
    /// Its name, without the leading `/`.
    pub name: String,
    /// Its init process (0 when not running).
    pub pid: u32,
    /// Whether it runs.
    pub running: bool,
    /// Its `MESH_CIDR` / `WEAVE_CIDR`.
    pub cidr: Option<String>,
    /// Its network mode shares a namespace it does not own (`host`,
    /// `container:...`).
    pub shared_netns: bool,
}

impl Inspected {
    /// From the JSON of `GET /containers/{id}/json`.
    pub fn from_json(v: &Value) -> Option<Inspected> {
        let name = v.get("Name")?.as_str()?.trim_start_matches('/').to_string();
        let state = v.get("State");
        let pid = state
            .and_then(|s| s.get("Pid"))
            .and_then(Value::as_u64)
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or(0);
        let running = state
            .and_then(|s| s.get("Running"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let cidr = cidr_env(v.get("Config").and_then(|c| c.get("Env")));
        let shared_netns = shares_netns(v.get("HostConfig").and_then(|h| h.get("NetworkMode")));
        Some(Inspected {
            name,
            pid,
            running,
            cidr,
            shared_netns,
        })
    }

    /// The ADDRs to attach it with: `None` for `none`.
    pub fn addrs(&self) -> Result<Option<Vec<String>>, String> {
        let addrs = addr::addrs_or_default(self.cidr.as_deref())?;
        Ok((!addr::all_none(&addrs)).then_some(addrs))
    }
}

/// A `NetworkMode` that shares a namespace the container does not own
/// (`host`, `container:...`): nothing of the mesh's to set up.
fn shares_netns(mode: Option<&Value>) -> bool {
    let mode = mode.and_then(Value::as_str).unwrap_or("");
    mode == "host" || mode.starts_with("container:")
}

/// A small answer of the proxy's own, in Docker's error shape.
pub fn error_response(code: u16, message: &str) -> Vec<u8> {
    let reason = match code {
        400 => "Bad Request",
        502 => "Bad Gateway",
        _ => "Error",
    };
    let body = json!({ "message": message }).to_string();
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// The driver

/// What every connection task shares.
struct Shared {
    upstream: PathBuf,
    control: PathBuf,
}

/// Bind the proxy's socket, replacing a stale one: root's, mode 0600, or
/// with `group` (from [`group_id`]) that group's too, mode 0660.
pub fn bind(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    // Root only until the group is set: no moment open to others.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    }
    Ok(l)
}

/// `--proxy-group`: the group's ID, from its name (or a number). One
/// line for the user when there is no such group.
pub fn group_id(name: &str) -> anyhow::Result<u32> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => match name.parse::<u32>() {
            Ok(gid) => Ok(gid),
            Err(_) => anyhow::bail!("--proxy-group {name:?}: no such group"),
        },
        Err(e) => anyhow::bail!("--proxy-group {name:?}: looking up the group: {e}"),
    }
}

/// Serve clients on `listener`, forwarding to the Docker socket `upstream`
/// and asking the mesh daemon on `control` to attach and detach.
pub async fn serve(listener: UnixListener, upstream: PathBuf, control: PathBuf) {
    info!(upstream = %upstream.display(), "Docker API proxy listening");
    let shared = Arc::new(Shared { upstream, control });
    loop {
        let client = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!("docker proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(client, &shared).await {
                debug!("docker proxy client: {e:#}");
            }
        });
    }
}

/// Read a head from `r` into `buf` (which may hold bytes already): returns
/// the head's length; `Ok(None)` on EOF before any byte.
pub(crate) async fn read_head<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, anyhow::Error> {
    let mut finder = HeadFinder::default();
    loop {
        if let Some(end) = finder.find(buf) {
            return Ok(Some(end));
        }
        if buf.len() > MAX_HEAD {
            return Err(ParseError::HeadTooLong.into());
        }
        let mut chunk = [0u8; 8192];
        let n = r.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            anyhow::bail!("connection closed inside the head");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn connection(mut client: UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let mut buf = Vec::new();
    let end = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client, &mut buf)).await {
        Err(_) => return Ok(()),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(end))) => end,
        Ok(Err(e)) => {
            let _ = client
                .write_all(&error_response(400, &format!("{e:#}")))
                .await;
            return Ok(());
        }
    };
    let mut head = match Head::parse(&buf[..end]) {
        Ok(h) => h,
        Err(e) => {
            let _ = client.write_all(&error_response(400, &e.to_string())).await;
            return Ok(());
        }
    };
    let rest = buf.split_off(end);
    debug!(method = %head.first, target = %head.second, "docker proxy request");
    if head.is_upgrade() {
        let mut up = match connect_upstream(shared).await {
            Some(u) => u,
            None => return reply_502(&mut client, shared).await,
        };
        up.write_all(&head.emit()).await?;
        up.write_all(&rest).await?;
        tokio::io::copy_bidirectional(&mut client, &mut up).await?;
        return Ok(());
    }
    let route = Route::of(&head.first, &head.second);
    match route {
        Route::Create { name } => create(client, head, rest, name, shared).await,
        Route::Start(id) => {
            head.set("Connection", "close");
            let hook = |status: u16| async move {
                if (200..300).contains(&status) {
                    attach_started(&id, shared).await;
                }
            };
            forward(client, head, rest, shared, hook).await
        }
        Route::Delete(id) => {
            head.set("Connection", "close");
            let before = inspect(&id, shared).await;
            let hook = |status: u16| async move {
                if (200..300).contains(&status) {
                    if let Some(c) = before {
                        detach(&c.name, shared).await;
                    }
                }
            };
            forward(client, head, rest, shared, hook).await
        }
        Route::Stop(id) => {
            head.set("Connection", "close");
            let before = inspect(&id, shared).await;
            let hook = |status: u16| async move {
                if (200..300).contains(&status) {
                    // Gone already (`--rm`: the engine removes it as it
                    // stops, maybe before this answer): stopped too.
                    match after_stop(&id, shared).await {
                        After::Stopped(name) => detach(&name, shared).await,
                        After::Gone => {
                            if let Some(c) = &before {
                                detach(&c.name, shared).await;
                            }
                        }
                        After::Running | After::Unknown => {}
                    }
                }
            };
            forward(client, head, rest, shared, hook).await
        }
        Route::Other => {
            head.set("Connection", "close");
            forward(client, head, rest, shared, |_| async {}).await
        }
    }
}

async fn connect_upstream(shared: &Shared) -> Option<UnixStream> {
    match UnixStream::connect(&shared.upstream).await {
        Ok(s) => Some(s),
        Err(e) => {
            if crate::warn::WarnLimit::allow(crate::warn::Kind::Docker) {
                warn!(upstream = %shared.upstream.display(), "docker proxy: cannot reach the Docker daemon: {e}");
            }
            None
        }
    }
}

async fn reply_502(client: &mut UnixStream, shared: &Shared) -> anyhow::Result<()> {
    let msg = format!(
        "mesh proxy: cannot reach the Docker daemon at unix://{}",
        shared.upstream.display()
    );
    client.write_all(&error_response(502, &msg)).await?;
    Ok(())
}

/// Forward `head` and the client's bytes upstream; read the answer's head,
/// run `hook` with its status, then hand the answer to the client and copy
/// until the upstream closes.
async fn forward<F, Fut>(
    mut client: UnixStream,
    head: Head,
    rest: Vec<u8>,
    shared: &Shared,
    hook: F,
) -> anyhow::Result<()>
where
    F: FnOnce(u16) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(up) = connect_upstream(shared).await else {
        return reply_502(&mut client, shared).await;
    };
    let (mut up_r, mut up_w) = up.into_split();
    let (mut cl_r, mut cl_w) = client.into_split();
    up_w.write_all(&head.emit()).await?;
    up_w.write_all(&rest).await?;
    // The client's body (if any) flows upstream while the answer comes.
    let upload = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut cl_r, &mut up_w).await;
        let _ = up_w.shutdown().await;
    });
    let mut buf = Vec::new();
    let end = match read_head(&mut up_r, &mut buf).await {
        Ok(Some(end)) => end,
        Ok(None) => {
            upload.abort();
            return Ok(());
        }
        Err(e) => {
            upload.abort();
            let _ = cl_w.write_all(&buf).await;
            return Err(e);
        }
    };
    let status = Head::parse(&buf[..end]).map_or(0, |h| h.status());
    hook(status).await;
    cl_w.write_all(&buf).await?;
    let r = tokio::io::copy(&mut up_r, &mut cl_w).await;
    let _ = cl_w.shutdown().await;
    upload.abort();
    r?;
    Ok(())
}

/// `POST /containers/create`: read the whole body, rewrite it, forward it.
async fn create(
    mut client: UnixStream,
    mut head: Head,
    mut rest: Vec<u8>,
    name: Option<String>,
    shared: &Shared,
) -> anyhow::Result<()> {
    let body = match read_body(&mut client, &head, &mut rest).await {
        Ok(b) => b,
        Err(e) => {
            let _ = client
                .write_all(&error_response(400, &format!("{e:#}")))
                .await;
            return Ok(());
        }
    };
    let domain = mesh_domain(shared).await;
    let body = match rewrite_create(&body, domain.as_deref(), name.as_deref()) {
        Ok(Some(b)) => b,
        Ok(None) => body,
        Err(e) => {
            // Docker would refuse it too; let it say so in its words.
            debug!("docker proxy: create body not rewritten: {e}");
            body
        }
    };
    head.remove("Transfer-Encoding");
    head.set("Content-Length", &body.len().to_string());
    head.set("Connection", "close");
    forward(client, head, body, shared, |_| async {}).await
}

/// The request's body, whole: by `Content-Length`, chunked, or none.
pub(crate) async fn read_body<R: AsyncRead + Unpin>(
    client: &mut R,
    head: &Head,
    buf: &mut Vec<u8>,
) -> anyhow::Result<Vec<u8>> {
    if head.is_chunked() {
        // One decoder for the whole body: it goes on from where it
        // stopped, so a body sent byte by byte costs linear time.
        let mut d = Dechunker::default();
        loop {
            if d.poll(buf)?.is_some() {
                return Ok(d.into_body());
            }
            if buf.len() > MAX_BODY + MAX_HEAD {
                return Err(ParseError::BodyTooLong.into());
            }
            read_more(client, buf).await?;
        }
    }
    let len = head.content_length()?.unwrap_or(0);
    if len > MAX_BODY {
        return Err(ParseError::BodyTooLong.into());
    }
    while buf.len() < len {
        read_more(client, buf).await?;
    }
    buf.truncate(len);
    Ok(std::mem::take(buf))
}

async fn read_more<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 16384];
    let n = tokio::time::timeout(HEAD_TIMEOUT, r.read(&mut chunk))
        .await
        .map_err(|_| anyhow::anyhow!("timed out reading the body"))??;
    if n == 0 {
        anyhow::bail!("connection closed inside the body");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The mesh domain without its final dot, `None` when no DNS is served
/// (or the daemon does not answer).
async fn mesh_domain(shared: &Shared) -> Option<String> {
    match control(shared, Request::Status).await {
        Ok(Response::Status(s)) => s
            .dns
            .filter(|d| d.serving)
            .map(|d| d.domain.trim_end_matches('.').to_string()),
        Ok(other) => {
            warn!("docker proxy: the daemon's status: {other:?}");
            None
        }
        Err(e) => {
            warn!("docker proxy: asking the daemon for its DNS domain: {e:#}");
            None
        }
    }
}

async fn control(shared: &Shared, req: Request) -> anyhow::Result<Response> {
    let path = shared.control.clone();
    tokio::task::spawn_blocking(move || api::call(&path, &req, CONTROL_TIMEOUT)).await?
}

/// `GET /containers/{id}/json` on a connection of its own.
async fn inspect(id: &str, shared: &Shared) -> Option<Inspected> {
    let v = match get_json(&format!("/containers/{}/json", encode(id)), shared).await {
        Ok(v) => v,
        Err(e) => {
            warn!(container = %id, "docker proxy: inspecting the container: {e:#}");
            return None;
        }
    };
    let c = Inspected::from_json(&v);
    if c.is_none() {
        warn!(container = %id, "docker proxy: the container's inspection lacks its name");
    }
    c
}

/// A container after a kill or stop the engine answered with a 2xx.
enum After {
    /// Stopped (its name).
    Stopped(String),
    /// Still running (a kill with a signal it survives).
    Running,
    /// No such container any more (removed as it stopped: `--rm`).
    Gone,
    /// The engine's answer told nothing.
    Unknown,
}

async fn after_stop(id: &str, shared: &Shared) -> After {
    match get_json(&format!("/containers/{}/json", encode(id)), shared).await {
        Ok(v) => match Inspected::from_json(&v) {
            Some(c) if c.running => After::Running,
            Some(c) => After::Stopped(c.name),
            None => After::Unknown,
        },
        Err(e)
            if e.downcast_ref::<StatusError>()
                .is_some_and(StatusError::no_such_container) =>
        {
            After::Gone
        }
        Err(e) => {
            warn!(container = %id, "docker proxy: inspecting the container: {e:#}");
            After::Unknown
        }
    }
}

async fn get_json(path: &str, shared: &Shared) -> anyhow::Result<Value> {
    docker_get(&shared.upstream, path).await
}

/// `GET path` from the Docker API at `upstream` on a connection of its
/// own: the answer's JSON, or an error with the status and Docker's words.
/// (Path segments from users go through [`encode`].)
pub async fn docker_get(upstream: &Path, path: &str) -> anyhow::Result<Value> {
    let mut up = UnixStream::connect(upstream).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n");
    up.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(
        CONTROL_TIMEOUT,
        (&mut up)
            .take((MAX_HEAD + MAX_BODY) as u64)
            .read_to_end(&mut buf),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out"))??;
    let end = head_end(&buf).ok_or_else(|| anyhow::anyhow!("no complete answer"))?;
    let head = Head::parse(&buf[..end])?;
    let raw = &buf[end..];
    let body = if head.is_chunked() {
        dechunk(raw)?
            .ok_or_else(|| anyhow::anyhow!("truncated chunked answer"))?
            .0
    } else {
        match head.content_length()? {
            Some(n) if n <= raw.len() => raw[..n].to_vec(),
            Some(_) => anyhow::bail!("truncated answer"),
            None => raw.to_vec(),
        }
    };
    if !(200..300).contains(&head.status()) {
        return Err(StatusError {
            status: head.status(),
            message: String::from_utf8_lossy(&body).trim().to_string(),
        }
        .into());
    }
    Ok(serde_json::from_slice(&body)?)
}

/// [`docker_get`]'s error when the engine answered, but not with a 2xx
/// (`downcast_ref` it from the `anyhow::Error`).
#[derive(Debug, thiserror::Error)]
#[error("status {status}: {message}")]
pub struct StatusError {
    /// The answer's status code (404: no such container).
    pub status: u16,
    /// The answer's body (Docker's `{"message": ...}`).
    pub message: String,
}

impl StatusError {
    /// The engine has no such container: Docker's 404, or podman's 500
    /// with `"cause": "no such container"` (what it answers while it
    /// removes one).
    pub fn no_such_container(&self) -> bool {
        self.status == 404
            || serde_json::from_str::<Value>(&self.message)
                .is_ok_and(|v| v.get("cause").and_then(Value::as_str) == Some("no such container"))
    }
}

/// After a start: attach the container by PID with its CIDR variable.
async fn attach_started(id: &str, shared: &Shared) {
    let Some(c) = inspect(id, shared).await else {
        return;
    };
    if c.shared_netns {
        return;
    }
    let addrs = match c.addrs() {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(e) => {
            warn!(container = %c.name, "docker proxy: not attaching, bad MESH_CIDR/WEAVE_CIDR: {e}");
            return;
        }
    };
    if c.pid == 0 {
        // Exited already (`docker run --rm ... echo`): nothing to attach.
        if c.running {
            warn!(container = %c.name, "docker proxy: started but no PID; not attached");
        } else {
            debug!(container = %c.name, "docker proxy: exited before it could be attached");
        }
        return;
    }
    // Whatever holds the name now is this container's previous run
    // (restarted, or started again before the check for vanished
    // interfaces saw it exit): release it, then attach the new run.
    detach(&c.name, shared).await;
    let req = Request::Attach {
        addrs,
        name: Some(c.name.clone()),
        target: c.pid.to_string(),
        ifname: None,
        hand_over: None,
        port: None,
    };
    match control(shared, req).await {
        Ok(Response::Attached { cidrs }) => {
            info!(container = %c.name, pid = c.pid, cidrs = ?cidrs, "docker proxy: attached")
        }
        Ok(Response::Error { message }) => {
            if std::path::Path::new(&format!("/proc/{}", c.pid)).exists() {
                warn!(container = %c.name, pid = c.pid, "docker proxy: attach failed: {message}")
            } else {
                // Exited between the start and the attach.
                debug!(container = %c.name, pid = c.pid, "docker proxy: exited before it could be attached: {message}")
            }
        }
        Ok(other) => warn!(container = %c.name, "docker proxy: attach answered {other:?}"),
        Err(e) => warn!(container = %c.name, "docker proxy: attach failed: {e:#}"),
    }
}

/// After a remove, kill or stop: release the container's addresses.
async fn detach(name: &str, shared: &Shared) {
    let req = Request::Detach {
        addrs: Vec::new(),
        target: name.to_string(),
    };
    match control(shared, req).await {
        Ok(Response::Ok) => info!(container = %name, "docker proxy: detached"),
        // Not ours, or already released by the check for vanished interfaces.
        Ok(Response::Error { message }) => {
            debug!(container = %name, "docker proxy: detach: {message}")
        }
        Ok(other) => debug!(container = %name, "docker proxy: detach answered {other:?}"),
        Err(e) => warn!(container = %name, "docker proxy: detach failed: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_request_head() {
        let raw = b"POST /v1.41/containers/create?name=web HTTP/1.1\r\nHost: api.moby.localhost\r\nContent-Type: application/json\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n";
        assert_eq!(head_end(raw), Some(raw.len()));
        let mut h = Head::parse(raw).expect("parses");
        assert_eq!(h.first, "POST");
        assert_eq!(h.second, "/v1.41/containers/create?name=web");
        assert_eq!(h.third, "HTTP/1.1");
        assert_eq!(h.get("content-length"), Some("12"));
        assert_eq!(h.content_length(), Ok(Some(12)));
        assert!(!h.is_upgrade());
        h.set("Connection", "close");
        let again = Head::parse(&h.emit()).expect("round trip");
        assert_eq!(again.get("Connection"), Some("close"));
        assert_eq!(
            again
                .headers
                .iter()
                .filter(|(k, _)| k == "Connection")
                .count(),
            1
        );
    }

    #[test]
    fn rejects_malformed_heads() {
        assert!(Head::parse(b"\r\n\r\n").is_err());
        assert!(Head::parse(b"GET\r\n\r\n").is_err());
        assert!(Head::parse(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").is_err());
        assert!(Head::parse(b"GET / HTTP/1.1\r\nbad name: x\r\n\r\n").is_err());
        assert!(Head::parse(&[0xff, 0xfe, b' ', b'/', b'\r', b'\n']).is_err());
        let h = Head::parse(b"POST /x HTTP/1.1\r\nContent-Length: -3\r\n\r\n").expect("head");
        assert!(h.content_length().is_err());
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }

    #[test]
    fn sees_upgrades() {
        let h = Head::parse(
            b"POST /v1.41/exec/abc/start HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n",
        )
        .expect("head");
        assert!(h.is_upgrade());
        let h = Head::parse(b"POST /x HTTP/1.1\r\nConnection: keep-alive, upgrade\r\n\r\n")
            .expect("head");
        assert!(h.is_upgrade());
    }

    #[test]
    fn routes_requests() {
        assert_eq!(
            Route::of("POST", "/v1.41/containers/create?name=web"),
            Route::Create {
                name: Some("web".into())
            }
        );
        assert_eq!(
            Route::of("POST", "/containers/create"),
            Route::Create { name: None }
        );
        assert_eq!(
            Route::of("POST", "/v1.41/containers/abc/start"),
            Route::Start("abc".into())
        );
        assert_eq!(
            Route::of("POST", "/v1.41/containers/abc/restart?t=0"),
            Route::Start("abc".into())
        );
        assert_eq!(
            Route::of("DELETE", "/v1.41/containers/web?force=1"),
            Route::Delete("web".into())
        );
        assert_eq!(
            Route::of("POST", "/containers/web/kill?signal=KILL"),
            Route::Stop("web".into())
        );
        assert_eq!(Route::of("GET", "/v1.41/containers/web/json"), Route::Other);
        assert_eq!(
            Route::of("POST", "/v1.41/containers/web/wait"),
            Route::Other
        );
        assert_eq!(
            Route::of("POST", "/version/containers/create"),
            Route::Other
        );
        assert_eq!(
            Route::of("POST", "/containers/a%2Fb/start"),
            Route::Start("a/b".into())
        );
        assert_eq!(decode("%"), "%");
        assert_eq!(decode("a%4"), "a%4");
        assert_eq!(decode("a%zz"), "a%zz");
        assert_eq!(decode("a%+1"), "a% 1");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(decode(&encode("wéb/1")), "wéb/1");
    }

    #[test]
    fn decodes_chunked_bodies() {
        let raw = b"4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\n\r\nNEXT";
        let (body, used) = dechunk(raw).expect("valid").expect("complete");
        assert_eq!(body, b"{\"a\":1}");
        assert_eq!(&raw[used..], b"NEXT");
        // With a trailer.
        let raw = b"1\r\nx\r\n0\r\nX-T: y\r\n\r\n";
        let (body, used) = dechunk(raw).expect("valid").expect("complete");
        assert_eq!((body.as_slice(), used), (&b"x"[..], raw.len()));
        // Incomplete at every cut.
        let raw = b"4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        for cut in 0..raw.len() {
            assert_eq!(dechunk(&raw[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"2\r\nabXY").is_err());
        assert_eq!(dechunk(b"ffffffffff\r\n"), Err(ParseError::BodyTooLong));
        // A size line of 1024 bytes or more is refused whether its CRLF
        // came with it or not (fuzzing found the two disagreeing).
        let line = |len: usize| {
            let mut raw = b"1;".to_vec();
            raw.resize(len, b'x');
            raw.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
            raw
        };
        assert!(dechunk(&line(1023)).expect("valid").is_some());
        assert!(dechunk(&line(1024)).is_err());
        assert!(dechunk(&line(1024)[..1025]).is_err());
        assert_eq!(dechunk(&line(1024)[..1024]), Ok(None));
    }

    /// A chunked body sent byte by byte, the way a slow client may: the
    /// proxy's decoder looks at each byte a bounded number of times. (It
    /// used to call `dechunk` on the whole buffer after every read: about
    /// n²/2 bytes looked at, here some 10^9.) Work is counted, not timed.
    #[test]
    fn chunked_body_byte_by_byte_takes_linear_work() {
        let mut raw = Vec::new();
        for _ in 0..3000 {
            raw.extend_from_slice(b"3;ext=1\r\nabc\r\n");
        }
        raw.extend_from_slice(b"4e20\r\n");
        raw.extend(std::iter::repeat_n(b'x', 20_000));
        raw.extend_from_slice(b"\r\n0\r\nX-T: y\r\nX-U: z\r\n\r\n");
        let mut d = Dechunker::default();
        let mut done = None;
        for n in 0..=raw.len() {
            if let Some(used) = d.poll(&raw[..n]).expect("valid") {
                done = Some((n, used));
                break;
            }
        }
        assert_eq!(done, Some((raw.len(), raw.len())));
        let scanned = d.scanned();
        let n = raw.len() as u64;
        assert!(scanned <= 3 * n, "{scanned} bytes looked at for {n}");
        let body = d.into_body();
        assert_eq!(
            Some(body.clone()),
            dechunk(&raw).expect("valid").map(|(b, _)| b)
        );
        assert_eq!(body.len(), 3 * 3000 + 20_000);
        // A size line that never ends is refused after 1 KiB, also byte by
        // byte, having looked at each byte at most twice.
        let mut d = Dechunker::default();
        let raw = vec![b'1'; 5000];
        let err = (0..=raw.len()).find_map(|n| d.poll(&raw[..n]).err());
        assert!(err.is_some());
        assert!(d.scanned() <= 2 * 1030, "{}", d.scanned());
    }

    /// A head sent byte by byte: each byte is looked at a bounded number
    /// of times (`head_end` on the whole buffer after every read was
    /// quadratic, about 2·10^9 bytes for a 64 KiB head).
    #[test]
    fn head_byte_by_byte_takes_linear_work() {
        let mut raw = b"POST /containers/create HTTP/1.1\r\n".to_vec();
        while raw.len() < MAX_HEAD - 100 {
            raw.extend_from_slice(b"X-Pad: \r\r\n\r\n\r\r\n");
            raw.truncate(raw.len() - 2);
            raw.extend_from_slice(b"1\r\n");
        }
        raw.extend_from_slice(b"\r\n");
        let end = head_end(&raw);
        assert!(end.is_some());
        let mut f = HeadFinder::default();
        let found = (0..=raw.len()).find_map(|n| f.find(&raw[..n]));
        assert_eq!(found, end);
        let n = end.unwrap_or(0) as u64;
        assert!(
            f.scanned() <= 4 * n,
            "{} bytes looked at for {n}",
            f.scanned()
        );
    }

    /// `read_head` and `read_body` over a reader that gives one byte at a
    /// time still read the whole request right.
    #[tokio::test]
    async fn head_and_chunked_body_read_byte_by_byte() {
        struct Dribble(Vec<u8>, usize);
        impl AsyncRead for Dribble {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                out: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let i = self.1;
                if let Some(&b) = self.0.get(i) {
                    out.put_slice(&[b]);
                    self.1 += 1;
                }
                std::task::Poll::Ready(Ok(()))
            }
        }
        let raw = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let mut r = Dribble(raw.to_vec(), 0);
        let mut buf = Vec::new();
        let end = read_head(&mut r, &mut buf)
            .await
            .expect("read")
            .expect("head");
        assert_eq!(&buf[..end], &raw[..end]);
        let head = Head::parse(&buf[..end]).expect("head");
        let mut rest = buf.split_off(end);
        let body = read_body(&mut r, &head, &mut rest).await.expect("body");
        assert_eq!(body, b"hello");
    }

    #[test]
    fn rewrites_create_bodies() {
        let body = br#"{"Image":"bbox","Env":["WEAVE_CIDR=net:198.19.8.0/24"],"HostConfig":{"NetworkMode":"none","Dns":[],"DnsSearch":null}}"#;
        let out = rewrite_create(body, Some("mesh.local"), Some("web"))
            .expect("valid")
            .expect("changed");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["HostConfig"]["Dns"], json!(["127.0.0.11"]));
        assert_eq!(v["HostConfig"]["DnsSearch"], json!(["mesh.local"]));
        assert_eq!(v["HostConfig"]["NetworkMode"], "none");
        assert_eq!(v["Hostname"], "web");
        assert_eq!(v["Domainname"], "mesh.local");
        assert_eq!(v["Image"], "bbox");

        // What the user gave is kept; no HostConfig at all is fine.
        let body = br#"{"Hostname":"h","HostConfig":{"Dns":["1.1.1.1"],"DnsSearch":["x.org"]}}"#;
        assert_eq!(
            rewrite_create(body, Some("mesh.local"), Some("web")).expect("valid"),
            None
        );
        let out = rewrite_create(br#"{"Image":"i"}"#, Some("mesh.local"), None)
            .expect("valid")
            .expect("changed");
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["HostConfig"]["Dns"], json!(["127.0.0.11"]));
        assert!(v.get("Hostname").is_none());

        // Not for the mesh: host network, CIDR none (MESH_CIDR wins), no DNS.
        let host = br#"{"HostConfig":{"NetworkMode":"host"}}"#;
        assert_eq!(rewrite_create(host, Some("mesh.local"), None), Ok(None));
        let none = br#"{"Env":["WEAVE_CIDR=net:default","MESH_CIDR=none"]}"#;
        assert_eq!(rewrite_create(none, Some("mesh.local"), None), Ok(None));
        let wins = br#"{"Env":["WEAVE_CIDR=none","MESH_CIDR=net:default"]}"#;
        assert!(rewrite_create(wins, Some("mesh.local"), None)
            .expect("valid")
            .is_some());
        assert_eq!(rewrite_create(br#"{}"#, None, None), Ok(None));

        assert!(rewrite_create(b"not json", Some("mesh.local"), None).is_err());
        assert!(rewrite_create(b"[1]", Some("mesh.local"), None).is_err());
        assert!(rewrite_create(br#"{"HostConfig":3}"#, Some("mesh.local"), None).is_err());
    }

    #[test]
    fn reads_inspections() {
        let v = json!({
            "Name": "/web",
            "State": {"Pid": 4242, "Running": true},
            "Config": {"Env": ["PATH=/bin", "WEAVE_CIDR=net:198.19.8.0/24 ip:198.19.9.9/24"]},
            "HostConfig": {"NetworkMode": "none"}
        });
        let c = Inspected::from_json(&v).expect("inspected");
        assert_eq!(c.name, "web");
        assert_eq!(c.pid, 4242);
        assert!(c.running && !c.shared_netns);
        assert_eq!(
            c.addrs(),
            Ok(Some(vec![
                "net:198.19.8.0/24".to_string(),
                "ip:198.19.9.9/24".to_string()
            ]))
        );
        let c = Inspected::from_json(&json!({"Name": "x", "State": {"Pid": 0}})).expect("x");
        assert_eq!(c.addrs(), Ok(Some(vec!["net:default".to_string()])));
        let c = Inspected::from_json(&json!({"Name": "x", "Config": {"Env": ["MESH_CIDR=none"]}}))
            .expect("x");
        assert_eq!(c.addrs(), Ok(None));
        let c = Inspected::from_json(&json!({"Name": "x", "Config": {"Env": ["MESH_CIDR=bogus"]}}))
            .expect("x");
        assert!(c.addrs().is_err());
        assert_eq!(Inspected::from_json(&json!({"State": {}})), None);
    }

    #[test]
    fn sees_containers_gone() {
        let e = |status, message: &str| StatusError {
            status,
            message: message.to_string(),
        };
        assert!(e(404, r#"{"message":"No such container: web"}"#).no_such_container());
        let podman = r#"{"cause":"no such container","message":"container e43b does not exist in database: no such container","response":500}"#;
        assert!(e(500, podman).no_such_container());
        assert!(!e(500, r#"{"message":"boom"}"#).no_such_container());
        assert!(!e(500, "not json").no_such_container());
    }

    #[test]
    fn error_answers_are_json() {
        let r = error_response(502, "no \"daemon\"");
        let end = head_end(&r).expect("head");
        let h = Head::parse(&r[..end]).expect("head");
        assert_eq!(h.status(), 502);
        assert_eq!(h.content_length(), Ok(Some(r.len() - end)));
        let v: Value = serde_json::from_slice(&r[end..]).expect("json");
        assert_eq!(v["message"], "no \"daemon\"");
    }
}
