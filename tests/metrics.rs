//! Metrics and the status page (issue 19): the HTTP listener on
//! `127.0.0.1:6782` (`--metrics-addr`) of namespace peers, asked by a raw
//! HTTP client inside each host's namespace, linted by `promtool`, scraped
//! by a real Prometheus, and the page read by a real headless Chromium
//! through chromedriver's WebDriver API.
//!
//! Tools (Debian packages, installed by `scripts/test.sh`): `prometheus`
//! (with `promtool`), `chromium`, `chromium-driver`, `iproute2` (`ss`).
//! Every process a test starts is stopped by its PID (its process group,
//! for chromedriver and the browsers it starts) when the guard drops.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);
/// The metrics listener's default address.
const METRICS: &str = "127.0.0.1:6782";

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 client, run inside a namespace

/// `METHOD path` to `addr` from inside namespace `ns`, with an optional JSON
/// body: the status code and the body. The server closes the connection
/// after its answer (both ours and chromedriver's do for `Connection:
/// close`).
fn http(
    ns: &str,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Vec<u8>), String> {
    let addr = addr.to_string();
    let req = {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    in_netns(ns, move || {
        let sock: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        // Read until the body is whole: chromedriver keeps the connection
        // open whatever the request says.
        let mut raw = Vec::new();
        let mut chunk = [0u8; 16384];
        loop {
            if let Some(r) = complete(&raw) {
                return r;
            }
            let n = s
                .read(&mut chunk)
                .map_err(|e| format!("read {addr}: {e}"))?;
            if n == 0 {
                return parse_response(&raw);
            }
            raw.extend_from_slice(&chunk[..n]);
        }
    })
}

/// The response, once `raw` holds all of it by its `Content-Length` or
/// its last chunk.
fn complete(raw: &[u8]) -> Option<Result<(u16, Vec<u8>), String>> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let whole = match length {
        Some(n) => body.len() >= n,
        None => head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n"),
    };
    whole.then(|| parse_response(raw))
}

/// Status code and body of a whole HTTP/1.1 response (chunked or not).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of head")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or("bad chunk")?;
            let size = usize::from_str_radix(
                String::from_utf8_lossy(&rest[..line_end])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|e| e.to_string())?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size).ok_or("short chunk")?);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
        body = out;
    }
    Ok((code, body))
}

/// `GET path` of a host's metrics listener at `addr`: code and body text.
fn get(h: &Host, addr: &str, path: &str) -> Result<(u16, String), String> {
    http(&h.ns, addr, "GET", path, None).map(|(c, b)| (c, String::from_utf8_lossy(&b).to_string()))
}

/// Every field name of a JSON value, as paths (`a.b`, `a[].b`); the maps
/// keyed by data (counters by reason, path MTUs by peer) are not entered.
fn field_paths(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                if !["drops", "sleeve.drops", "sleeve.path_mtu"].contains(&p.as_str()) {
                    field_paths(v, &p, out);
                }
            }
        }
        Value::Array(a) => a
            .iter()
            .for_each(|v| field_paths(v, &format!("{prefix}[]"), out)),
        _ => {}
    }
}

/// The value of the sample `name{labels}` (labels as written) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The sum of every sample of metric `name` (any labels).
fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------
// Processes the tests start

/// A process started by a test, in its own process group; the group is
/// stopped (SIGTERM, then SIGKILL) by its id when the guard drops.
struct Proc {
    child: Child,
    what: String,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: std::process::Command, what: &str, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc {
            child,
            what: what.to_string(),
            log,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Panics (with the log's tail) if it has exited.
    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.what, self.log_tail());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGTERM);
        if wait_child(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = wait_child(&mut self.child, Duration::from_secs(5));
        }
        // Whatever else of the group outlived its leader.
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Whether a program is installed; when not, the test says so loudly and
/// is skipped (scripts/test.sh installs them).
fn have(program: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("\n*** SKIPPED: {program} is not installed (scripts/test.sh installs it) ***\n");
    }
    found
}

// ---------------------------------------------------------------------------
// Tests

/// Two peers: `/ready` is 503 with its reason while the ring waits for a
/// second peer, then 200; `/status` is `mesh report`; `/metrics` has the
/// mesh's numbers and passes `promtool check metrics`; nothing listens on a
/// non-loopback address but 6783 and 6784; a port in use and a bad
/// `--metrics-addr` are one clear line each.
#[test]
fn metrics_status_and_ready_on_loopback() {
    let Some(mut w) = World::new("metrics_status_ready") else {
        return;
    };
    if !have("promtool") {
        return;
    }
    let h1 = w.add_host();
    let h2 = w.add_host();
    let overlay = ["--ipalloc-range", "198.19.0.0/16"];

    // A bad address, and a port in use: one line each, naming it.
    let bad = w.try_launch(&h1, &["--metrics-addr", "localhost:x"]);
    let err = String::from_utf8_lossy(&bad.stderr).to_string();
    assert!(
        !bad.status.success() && err.contains("localhost:x"),
        "{err}"
    );
    let squatter = in_netns(&h1.ns, || {
        std::net::TcpListener::bind(METRICS).expect("bind 6782")
    });
    let busy = w.try_launch(&h1, &overlay);
    let err = String::from_utf8_lossy(&busy.stderr).to_string();
    assert!(
        !busy.status.success(),
        "launched with 6782 taken: {}",
        show(&busy)
    );
    assert!(
        err.contains(METRICS) && err.contains("--metrics-addr"),
        "{err}"
    );
    drop(squatter);

    // h1 alone waits for a second voter: not ready, and says why.
    let mut a = overlay.to_vec();
    a.extend(["--ipalloc-init", "consensus=2", "--nickname", "one"]);
    w.launch(&h1, &a);
    let (code, body) = get(&h1, METRICS, "/ready").expect("/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready: IPAM no ring yet"), "{body}");
    h1.mesh_ok(&["prime"]);
    let (code, body) = get(&h1, METRICS, "/ready").expect("/ready");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("not ready: IPAM awaiting consensus"),
        "{body}"
    );
    let mut a = overlay.to_vec();
    a.extend(["--nickname", "two", "198.18.0.1"]);
    w.launch(&h2, &a);
    for h in [&h1, &h2] {
        wait_until(
            DEADLINE,
            &format!("{} is ready", h.name),
            || matches!(get(h, METRICS, "/ready"), Ok((200, ref b)) if b == "ready\n"),
        );
    }

    // Traffic for the counters: an allocation, a ping over the mesh, a
    // name looked up.
    let c1 = w.add_container("web");
    let c2 = w.add_container("client");
    w.attach_net(&h1, &c1, "198.19.0.0/16");
    let ip2 = w.attach_net(&h2, &c2, "198.19.0.0/16");
    wait_ping(&c1, &ip2, DEADLINE);
    wait_until(DEADLINE, "web is served by name on h2", || {
        !dig_a(&c2, "web").is_empty()
    });

    for (h, me, other) in [(&h1, "one", "two"), (&h2, "two", "one")] {
        // /status is mesh report: the same fields, the same peer.
        let report: Value = serde_json::from_str(&h.mesh_ok(&["report"])).expect("report JSON");
        let (code, body) = get(h, METRICS, "/status").expect("/status");
        assert_eq!(code, 200, "{body}");
        let status: Value = serde_json::from_str(&body).expect("/status JSON");
        let (mut a, mut b) = (BTreeSet::new(), BTreeSet::new());
        field_paths(&report, "", &mut a);
        field_paths(&status, "", &mut b);
        assert_eq!(a, b, "/status and mesh report have different fields");
        for f in [
            "name",
            "nickname",
            "version",
            "protocol",
            "port",
            "mtu",
            "encryption",
        ] {
            assert_eq!(report[f], status[f], "{f}");
        }
        assert_eq!(status["nickname"], me);
        let peers = |v: &Value| -> BTreeSet<String> {
            v["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["nickname"].as_str().map(String::from))
                .collect()
        };
        assert_eq!(peers(&report), peers(&status));
        assert!(peers(&status).contains(other));

        // /metrics: the numbers, then the linter.
        let (code, text) = get(h, METRICS, "/metrics").expect("/metrics");
        assert_eq!(code, 200, "{text}");
        for series in [
            "mesh_peers_known",
            "mesh_peers_reachable",
            "mesh_ipam_ready",
        ] {
            let v = sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
            assert!(v >= 1.0, "{series} = {v}");
        }
        assert_eq!(sample(&text, "mesh_peers_reachable"), Some(2.0), "{text}");
        let established: f64 = text
            .lines()
            .filter(|l| l.starts_with("mesh_connections{state=\"established\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(established, 1.0, "{text}");
        for name in [
            "mesh_overlay_frames_total",
            "mesh_overlay_bytes_total",
            "mesh_gossip_bytes_total",
            "mesh_ipam_allocation_seconds_count",
        ] {
            assert!(sum(&text, name) > 0.0, "{name} is 0 or missing:\n{text}");
        }
        assert!(
            sample(&text, "mesh_ipam_addresses{state=\"owned\"}").unwrap_or(0.0) > 0.0,
            "{text}"
        );
        for name in [
            "mesh_filter_drops_total",
            "mesh_handshake_failures_total",
            "mesh_dns_queries_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} counter")),
                "{name}:\n{text}"
            );
        }
        let file = w.dir.join(format!("{}.metrics", h.name));
        std::fs::write(&file, &text).expect("write scrape");
        let out = run(
            std::process::Command::new("sh").args([
                "-c",
                &format!("promtool check metrics < {}", file.display()),
            ]),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "promtool check metrics: {}\n{text}",
            show(&out)
        );
    }
    // The name was asked on h2 and answered there.
    let (_, text) = get(&h2, METRICS, "/metrics").expect("/metrics");
    assert!(
        sample(&text, "mesh_dns_queries_total{outcome=\"answered\"}").unwrap_or(0.0) >= 1.0,
        "{text}"
    );

    // The page and the picture are there; anything else is 404.
    let (code, page) = get(&h1, METRICS, "/").expect("/");
    assert!(
        code == 200 && page.contains("<title>mesh status</title>"),
        "{code} {page}"
    );
    let (code, svg) = get(&h1, METRICS, "/topology.svg").expect("svg");
    assert_eq!(code, 200);
    assert_eq!(svg.matches("<g class=\"node\"").count(), 2, "{svg}");
    assert_eq!(get(&h1, METRICS, "/nope").map(|r| r.0), Ok(404));

    // Nothing listens beyond loopback but the mesh's own ports.
    for h in [&h1, &h2] {
        let out = run(
            &mut h.command("ss", &["-H", "-lntup"]),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "ss: {}", show(&out));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut seen_metrics = false;
        for line in text.lines() {
            let local = line.split_whitespace().nth(4).unwrap_or("");
            let (ip, port) = local.rsplit_once(':').unwrap_or((local, ""));
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            let ip = ip.split('%').next().unwrap_or(ip);
            let loopback = ip.starts_with("127.") || ip == "::1";
            seen_metrics |= local == METRICS;
            assert!(
                loopback || port == "6783" || port == "6784",
                "{} listens on {local}, not loopback nor 6783/6784:\n{text}",
                h.name
            );
        }
        assert!(
            seen_metrics,
            "no listener on {METRICS} on {}:\n{text}",
            h.name
        );
    }

    // A host with a password knocks: h1 counts a handshake failure, by
    // its reason.
    let h3 = w.add_host();
    w.launch(&h3, &["--password", "not-the-mesh's", "198.18.0.1"]);
    wait_until(DEADLINE, "h1 counts a password handshake failure", || {
        get(&h1, METRICS, "/metrics").is_ok_and(|(_, t)| {
            sample(&t, "mesh_handshake_failures_total{reason=\"password\"}").unwrap_or(0.0) >= 1.0
        })
    });
}

/// A real Prometheus scrapes both peers (moved off loopback with
/// `--metrics-addr`), and its query API sees them up and a mesh metric.
#[test]
fn a_real_prometheus_scrapes_two_peers() {
    let Some(mut w) = World::new("prometheus_scrapes") else {
        return;
    };
    if !have("prometheus") {
        return;
    }
    let h1 = w.add_host();
    let h2 = w.add_host();
    w.launch(
        &h1,
        &[
            "--ipalloc-range",
            "198.19.0.0/16",
            "--metrics-addr",
            "198.18.0.1:6782",
        ],
    );
    w.launch(
        &h2,
        &[
            "--ipalloc-range",
            "198.19.0.0/16",
            "--metrics-addr",
            "198.18.0.2",
            "198.18.0.1",
        ],
    );
    for h in [&h1, &h2] {
        let addr = format!("{}:6782", h.ip);
        wait_until(DEADLINE, &format!("{} serves /metrics", h.name), || {
            matches!(get(h, &addr, "/metrics"), Ok((200, _)))
        });
        // Moved, not doubled: loopback is free.
        assert!(
            get(h, METRICS, "/metrics").is_err(),
            "{} still on loopback",
            h.name
        );
    }
    let config = w.dir.join("prometheus.yml");
    std::fs::write(
        &config,
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n  - job_name: mesh\n    static_configs:\n      - targets: ['198.18.0.1:6782', '198.18.0.2:6782']\n",
    )
    .expect("write prometheus.yml");
    let tsdb = w.dir.join("tsdb");
    let cmd = h1.command(
        "prometheus",
        &[
            &format!("--config.file={}", config.display()),
            &format!("--storage.tsdb.path={}", tsdb.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
    );
    let mut prom = Proc::spawn(cmd, "prometheus", w.dir.join("prometheus.log"));
    let query = |q: &str| -> Result<Vec<Value>, String> {
        let (code, body) = http(
            &h1.ns,
            "127.0.0.1:9090",
            "GET",
            &format!("/api/v1/query?query={q}"),
            None,
        )?;
        if code != 200 {
            return Err(format!("{code} {}", String::from_utf8_lossy(&body)));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    };
    wait_for(
        Duration::from_secs(60),
        "Prometheus sees both peers up",
        || {
            prom.check_alive();
            let up = query("up")?;
            let ok = up
                .iter()
                .filter(|r| r["value"][1] == "1")
                .filter_map(|r| r["metric"]["instance"].as_str())
                .collect::<BTreeSet<_>>();
            if ok.len() == 2 {
                Ok(())
            } else {
                Err(format!("up: {up:?}"))
            }
        },
    );
    wait_for(
        DEADLINE,
        "Prometheus has mesh_peers_reachable = 2 from both",
        || {
            prom.check_alive();
            let r = query("mesh_peers_reachable")?;
            let twos = r.iter().filter(|r| r["value"][1] == "2").count();
            if twos == 2 {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        },
    );
}

/// A WebDriver session in chromedriver (which runs in a host's namespace).
struct Browser<'a> {
    ns: &'a str,
    addr: String,
    session: String,
}

impl Browser<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (code, bytes) = http(
            self.ns,
            &self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        )?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{code}: {e}"))?;
        if code != 200 {
            return Err(format!("{method} {path}: {code} {v}"));
        }
        Ok(v["value"].clone())
    }

    /// The value of a script run in the page.
    fn eval(&self, script: &str) -> Result<Value, String> {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = self.call("DELETE", "", None);
    }
}

/// The page's view: per peer row (nickname, reachable), the picture's
/// nodes, how many polls it made.
const READ_PAGE: &str = r#"
  const rows = [...document.querySelectorAll('#peers tr.peer')]
    .map(r => [r.dataset.nickname, r.dataset.reachable]);
  const nodes = [...document.querySelectorAll('#topology g.node')]
    .map(n => [n.dataset.nickname, n.dataset.reachable]);
  return { rows, nodes, lines: document.querySelectorAll('#topology line.edge').length,
           polls: Number(document.body.dataset.polls) };
"#;

/// Three peers; a headless Chromium shows every one of them on the status
/// page (table and picture); when one stops, the page shows it gone or
/// unreachable. The screenshot lands in `target/status-page.png`.
#[test]
fn the_status_page_in_a_headless_browser() {
    let Some(mut w) = World::new("status_page_browser") else {
        return;
    };
    if !have("chromium") || !have("chromedriver") {
        return;
    }
    let hosts: Vec<Host> = (0..3).map(|_| w.add_host()).collect();
    let nicks = ["alpha", "bravo", "charlie"];
    for (i, h) in hosts.iter().enumerate() {
        let mut a = vec!["--ipalloc-range", "198.19.0.0/16", "--nickname", nicks[i]];
        if i > 0 {
            a.push("198.18.0.1");
        }
        w.launch(h, &a);
    }
    let c = w.add_container("webpage");
    w.attach_net(&hosts[0], &c, "198.19.0.0/16");
    let h1 = &hosts[0];
    wait_until(DEADLINE, "h1 reaches both others", || {
        get(h1, METRICS, "/metrics")
            .is_ok_and(|(_, t)| sample(&t, "mesh_peers_reachable") == Some(3.0))
    });

    let cmd = h1.command("chromedriver", &["--port=9515"]);
    let mut driver = Proc::spawn(cmd, "chromedriver", w.dir.join("chromedriver.log"));
    let addr = "127.0.0.1:9515".to_string();
    wait_for(DEADLINE, "chromedriver answers", || {
        driver.check_alive();
        match http(&h1.ns, &addr, "GET", "/status", None) {
            Ok((200, _)) => Ok(()),
            Ok((c, b)) => Err(format!("{c} {}", String::from_utf8_lossy(&b))),
            Err(e) => Err(e),
        }
    });
    let profile = w.dir.join("chromium-profile");
    let caps = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900",
                format!("--user-data-dir={}", profile.display()),
            ]
        }
    }}});
    let (code, body) = http(&h1.ns, &addr, "POST", "/session", Some(&caps)).expect("new session");
    let v: Value = serde_json::from_slice(&body).expect("session JSON");
    assert_eq!(code, 200, "new session: {v}");
    let session = v["value"]["sessionId"]
        .as_str()
        .expect("a session id")
        .to_string();
    let browser = Browser {
        ns: &h1.ns,
        addr: addr.clone(),
        session,
    };
    browser
        .call(
            "POST",
            "/url",
            Some(json!({ "url": format!("http://{METRICS}/") })),
        )
        .expect("open the page");

    // Every peer, by nickname, reachable, in the table and the picture.
    let view = wait_for(DEADLINE, "the page shows three reachable peers", || {
        let v = browser.eval(READ_PAGE)?;
        let rows: BTreeSet<(String, String)> =
            serde_json::from_value(v["rows"].clone()).map_err(|e| e.to_string())?;
        let nodes: BTreeSet<(String, String)> =
            serde_json::from_value(v["nodes"].clone()).map_err(|e| e.to_string())?;
        let want: BTreeSet<(String, String)> = nicks
            .iter()
            .map(|n| (n.to_string(), "true".to_string()))
            .collect();
        if rows == want && nodes == want && v["lines"].as_u64() == Some(3) {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    });
    let polls_before = view["polls"].as_u64().unwrap_or(0);
    let text = browser
        .eval("return document.body.innerText")
        .expect("text");
    assert!(
        text.as_str()
            .is_some_and(|t| t.contains("webpage") && t.contains("198.19.0.0/16")),
        "{text}"
    );

    // charlie stops: the page shows it unreachable or gone, by itself.
    let pid = hosts[2].daemon_pid().expect("h3 pid");
    hosts[2].mesh_ok(&["stop"]);
    wait_until(DEADLINE, "h3's daemon exits", || !pid_alive(pid));
    wait_for(
        DEADLINE,
        "the page shows charlie unreachable or gone",
        || {
            let v = browser.eval(READ_PAGE)?;
            let rows: Vec<(String, String)> =
                serde_json::from_value(v["rows"].clone()).map_err(|e| e.to_string())?;
            let nodes: Vec<(String, String)> =
                serde_json::from_value(v["nodes"].clone()).map_err(|e| e.to_string())?;
            let gone =
                |l: &[(String, String)]| l.iter().all(|(n, r)| n != "charlie" || r == "false");
            let others_up = rows
                .iter()
                .filter(|(n, r)| n != "charlie" && r == "true")
                .count()
                == 2;
            if gone(&rows)
                && gone(&nodes)
                && others_up
                && v["polls"].as_u64().unwrap_or(0) > polls_before
            {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );

    let shot = browser
        .call("GET", "/screenshot", None)
        .expect("screenshot");
    let png = base64_decode(shot.as_str().expect("base64 PNG")).expect("valid base64");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/status-page.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    eprintln!("status page screenshot: {}", path.display());
    drop(browser);
    driver.check_alive();
}

/// Standard base64 (the WebDriver screenshot's encoding).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
