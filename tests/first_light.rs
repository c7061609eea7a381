//! First light: the smallest end-to-end story of mesh, on real kernel objects.
//!
//! Hosts are network namespaces on a private underlay (198.18.0.N), each with
//! a real `mesh` daemon; containers are namespaces attached with fixed
//! addresses in 198.19.1.0/24. The tests check that containers ping across
//! hosts; that with a password no payload crosses the underlay in the clear
//! (and, as the control, that without one it does); that peers without the
//! right password are refused and say why; that garbage sent at the ports does
//! not bring a daemon down; that a restarted daemon keeps its name and its
//! containers; and that CLI errors are one clear line.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;

/// How long containers may take to reach each other.
const PING_DEADLINE: Duration = Duration::from_secs(20);
/// How long a connection may take to show a state in `mesh status`.
const STATUS_DEADLINE: Duration = Duration::from_secs(20);
/// `ping -p` pattern: ASCII "mesh-plain".
const PATTERN_HEX: &str = "6d6573682d706c61696e";
/// The same bytes, looked for on the underlay.
const PATTERN: &[u8] = b"mesh-plain";
/// Ping payload size for the pattern pings.
const PATTERN_SIZE: usize = 200;

/// Whether `line` of `mesh status` is a connection in direction `dir` (`->`
/// or `<-`) with a remote address starting with `addr`.
fn is_conn(line: &str, dir: &str, addr: &str) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    words.len() >= 3 && words[0] == dir && words[1].starts_with(addr)
}

/// A connection line in state `state`.
fn conn_in_state(line: &str, dir: &str, addr: &str, state: &str) -> bool {
    is_conn(line, dir, addr) && line.split_whitespace().skip(2).any(|w| w == state)
}

/// An outbound connection line refused because of the password.
fn refused_for_password(line: &str, addr: &str) -> bool {
    is_conn(line, "->", addr)
        && line.to_lowercase().contains("password")
        && !line.split_whitespace().any(|w| w == "established")
}

/// Waits until a line of `host`'s `mesh status` satisfies `pred`; returns it.
fn wait_status_line(host: &Host, what: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_for(STATUS_DEADLINE, what, || {
        let text = host.try_status()?;
        text.lines()
            .find(|l| pred(l))
            .map(str::to_string)
            .ok_or(text)
    })
}

/// Asserts that `host`'s `mesh ps` lists container `c` (by its `--name`) with
/// `cidr` and the MAC its `ethmesh` really has.
fn assert_ps_lists(host: &Host, c: &Container, cidr: &str) {
    let ps = host.ps();
    let entry = ps.iter().find(|e| e.id == c.name).unwrap_or_else(|| {
        panic!(
            "`mesh ps` on {} does not list {}: {ps:?}",
            host.name, c.name
        )
    });
    assert!(
        entry.cidrs.iter().any(|x| x == cidr),
        "`mesh ps` on {} lists {} without {cidr}: {entry:?}",
        host.name,
        c.name
    );
    assert_eq!(
        Some(entry.mac.clone()),
        c.ethmesh_mac(),
        "`mesh ps` MAC of {} differs from its ethmesh",
        c.name
    );
}

/// Asserts that container `c` has an `ethmesh` with `cidr`.
fn assert_ethmesh(c: &Container, cidr: &str) {
    let addrs = c.ethmesh_addrs();
    assert!(
        addrs.contains(&format!("inet {cidr} ")),
        "{}'s ethmesh should have {cidr}; `ip addr` shows {addrs:?}",
        c.name
    );
}

/// Two hosts, one container each, pinging both ways while h1's underlay is
/// captured; with a password the payload must not show, without one it must.
fn two_hosts(test: &str, password: Option<&str>) {
    let Some(mut w) = World::new(test) else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");

    let mut args1 = vec!["--nickname", "h1"];
    let mut args2 = vec!["--nickname", "h2"];
    if let Some(p) = password {
        args1.extend(["--password", p]);
        args2.extend(["--password", p]);
    }
    args2.push("198.18.0.1");
    let name1 = w.launch(&h1, &args1);
    let name2 = w.launch(&h2, &args2);
    assert_ne!(
        name1, name2,
        "hosts with separate data dirs share a peer name"
    );

    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    assert_ethmesh(&c1, "198.19.1.1/24");
    assert_ethmesh(&c2, "198.19.1.2/24");

    let encryption = if password.is_some() {
        "Encryption: enabled"
    } else {
        "Encryption: disabled"
    };
    for (h, name) in [(&h1, &name1), (&h2, &name2)] {
        let status = h.status();
        let want_name = format!("Name: {name}({})", h.name);
        assert!(
            status.lines().any(|l| l.trim().starts_with(&want_name)),
            "{}'s status lacks {want_name:?}:\n{status}",
            h.name
        );
        assert!(
            status.lines().any(|l| l.trim() == encryption),
            "{}'s status lacks {encryption:?}:\n{status}",
            h.name
        );
    }
    wait_status_line(&h2, "h2's connection to h1 is established", |l| {
        conn_in_state(l, "->", "198.18.0.1:6783", "established")
    });
    wait_status_line(&h1, "h1 shows h2's connection established", |l| {
        conn_in_state(l, "<-", "198.18.0.2:", "established")
    });

    let capture = w.capture(&h1);
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);
    wait_until(PING_DEADLINE, "c1 pings c2 with the pattern", || {
        ping_pattern(&c1.ns, "198.19.1.2", PATTERN_HEX, PATTERN_SIZE)
    });
    wait_until(PING_DEADLINE, "c2 pings c1 with the pattern", || {
        ping_pattern(&c2.ns, "198.19.1.1", PATTERN_HEX, PATTERN_SIZE)
    });
    let pcap = capture.stop();
    if password.is_some() {
        assert!(
            !pcap.contains(PATTERN),
            "container payload crossed the underlay in the clear with a password set: {}",
            pcap.summary()
        );
        assert!(
            pcap.udp_count(PORT) > 0,
            "no UDP/{PORT} (sleeve) packets on the underlay: {}",
            pcap.summary()
        );
    } else {
        // The control: without a password the payload is visible, so the
        // check above can fail.
        assert!(
            pcap.contains(PATTERN),
            "without a password the ping payload should be visible on the underlay: {}",
            pcap.summary()
        );
    }

    assert_ps_lists(&h1, &c1, "198.19.1.1/24");
    assert_ps_lists(&h2, &c2, "198.19.1.2/24");
}

/// Issue test 1: two hosts, a container on each, ping both ways, `mesh ps`;
/// the payload is visible on the underlay (the control for test 2).
#[test]
fn two_hosts_ping_and_payload_is_visible_without_password() {
    two_hosts(
        "two_hosts_ping_and_payload_is_visible_without_password",
        None,
    );
}

/// Issue test 2: the same with a password; no payload byte pattern crosses
/// the underlay in the clear, yet sleeve packets do.
#[test]
fn password_mesh_pings_and_hides_payload() {
    two_hosts("password_mesh_pings_and_hides_payload", Some("s3cret"));
}

/// Issue test 3: a third host with the wrong password is refused (its status
/// says `password`), its container reaches nobody, and the others still talk.
#[test]
fn wrong_password_is_refused() {
    let Some(mut w) = World::new("wrong_password_is_refused") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let h3 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let c3 = w.add_container("c3");
    w.launch(&h1, &["--password", "s3cret"]);
    w.launch(&h2, &["--password", "s3cret", "198.18.0.1"]);
    w.launch(&h3, &["--password", "wrong", "198.18.0.1"]);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    w.attach(&h3, &c3, "198.19.1.3/24");

    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);
    wait_status_line(
        &h3,
        "h3's connection to h1 fails, naming the password",
        |l| refused_for_password(l, "198.18.0.1:6783"),
    );

    assert!(
        !ping3(&c3.ns, "198.19.1.1"),
        "c3 (wrong password) reached c1"
    );
    assert!(
        !ping3(&c3.ns, "198.19.1.2"),
        "c3 (wrong password) reached c2"
    );
    assert!(
        !ping3(&c1.ns, "198.19.1.3"),
        "c1 reached c3 (wrong password)"
    );
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);

    let status1 = h1.status();
    assert!(
        !status1
            .lines()
            .any(|l| conn_in_state(l, "<-", "198.18.0.3:", "established")),
        "h1 established a connection with the wrong-password host:\n{status1}"
    );
}

/// Issue test 3, second part: a peer without a password dialling one with is
/// refused, and so is one with a password dialling one without; both say
/// `password`, and no container traffic passes.
#[test]
fn missing_password_is_refused_both_ways() {
    let Some(mut w) = World::new("missing_password_is_refused_both_ways") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let h3 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    w.launch(&h1, &["--password", "s3cret"]);
    w.launch(&h2, &["198.18.0.1"]);
    w.launch(&h3, &["--password", "s3cret", "198.18.0.2"]);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");

    wait_status_line(
        &h2,
        "h2 (no password) is refused by h1 (password), naming the password",
        |l| refused_for_password(l, "198.18.0.1:6783"),
    );
    wait_status_line(
        &h3,
        "h3 (password) is refused by h2 (no password), naming the password",
        |l| refused_for_password(l, "198.18.0.2:6783"),
    );
    assert!(!ping3(&c2.ns, "198.19.1.1"), "c2 (no password) reached c1");
    assert!(!ping3(&c1.ns, "198.19.1.2"), "c1 reached c2 (no password)");
}

/// A TCP connection to `target` that writes `bytes` and closes; whether it
/// connected. Write errors (the daemon hanging up first) are expected.
fn tcp_send(target: SocketAddr, bytes: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(3)) else {
        return false;
    };
    let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Both);
    true
}

/// Random bytes of a random length below `max`.
fn junk(max: usize) -> Vec<u8> {
    random_bytes(random_below(max))
}

/// Beginnings that look like the control channel (the 8-byte hello
/// `MESH min max flags 0`, then records `kind len_hi len_lo payload`) before
/// turning into garbage; taken from `proto/src/{hello,frame}.rs`.
fn plausible_prefixes() -> Vec<Vec<u8>> {
    let hello: &[u8] = b"MESH\x01\xff\x00\x00";
    let hello_pw: &[u8] = b"MESH\x01\xff\x01\x00";
    let mut v: Vec<Vec<u8>> = vec![
        hello.to_vec(),
        hello_pw.to_vec(),
        b"MESH\x00\x00\x00\x00".to_vec(),  // version 0
        b"MESH\x05\x01\x00\x00".to_vec(),  // min > max
        b"MESH\xfe\xff\xff\xff".to_vec(),  // no common version
        b"MES".to_vec(),                   // truncated hello
        [hello, b"\x01\xff\xff"].concat(), // handshake claiming 65535 bytes
        [hello, b"\x01\x00\x20"].concat(), // handshake of 32 bytes
        [hello_pw, b"\x01\x00\x30"].concat(),
        [hello, b"\x02\x00\x40"].concat(), // transport before any handshake
        [hello, b"\x03\x01\xf4"].concat(), // refusal of 500 bytes
        [hello, b"\x03\xff\xff"].concat(), // refusal longer than allowed
        [hello, b"\x09\x00\x10"].concat(), // unknown record kind
        [hello, b"\x00\x00\x00"].concat(),
    ];
    // A refusal whose reason is not UTF-8.
    v.push([hello, b"\x03\x00\x04\xff\xfe\xfd\xfc"].concat());
    v
}

/// Sends the garbage of issue test 4 at `target`; returns how many TCP
/// connections were accepted.
fn send_garbage(target: SocketAddr) -> usize {
    let udp = UdpSocket::bind("0.0.0.0:0").expect("bind UDP");
    for _ in 0..200 {
        let _ = udp.send_to(&junk(2001), target);
    }
    // Every first byte once, and a few fixed shapes.
    for first in 0..=255u8 {
        let mut d = random_bytes(1 + random_below(64));
        d[0] = first;
        let _ = udp.send_to(&d, target);
    }
    for d in [vec![], vec![0u8; 1], vec![0u8; 1500], vec![0xffu8; 1500]] {
        let _ = udp.send_to(&d, target);
    }

    let mut connected = 0;
    for _ in 0..20 {
        connected += usize::from(tcp_send(target, &junk(4097)));
    }
    for prefix in plausible_prefixes() {
        let bytes = [prefix.clone(), junk(4097)].concat();
        connected += usize::from(tcp_send(target, &bytes));
        connected += usize::from(tcp_send(target, &prefix));
    }
    connected
}

/// Connections that send a hello (or nothing) and then stay silent, held
/// open by the caller while the daemon is checked.
fn idle_connections(target: SocketAddr) -> Vec<TcpStream> {
    (0..5)
        .filter_map(|i| {
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3)).ok()?;
            if i % 2 == 0 {
                let _ = s.set_write_timeout(Some(Duration::from_secs(3)));
                let _ = s.write_all(b"MESH\x01\xff\x00\x00");
            }
            Some(s)
        })
        .collect()
}

/// Issue test 4: random UDP datagrams and TCP streams (random, and
/// plausible-then-random) at h1's port 6783 from h2's namespace; h1's daemon
/// keeps running, answers `mesh status`, and the containers still ping.
#[test]
fn garbage_on_the_wire_does_not_kill_daemon() {
    let Some(mut w) = World::new("garbage_on_the_wire_does_not_kill_daemon") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    w.launch(&h1, &[]);
    w.launch(&h2, &["198.18.0.1"]);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);
    let pid1 = h1.daemon_pid().expect("h1 daemon pid");

    let target = SocketAddr::from(([198, 18, 0, 1], PORT));
    let (connected, idle) = in_netns(&h2.ns, || (send_garbage(target), idle_connections(target)));
    assert!(
        connected > 0,
        "no garbage TCP connection was accepted by h1"
    );

    assert!(pid_alive(pid1), "h1's daemon ({pid1}) died from garbage");
    h1.status();
    assert_eq!(h1.daemon_pid(), Some(pid1), "h1's daemon was replaced");
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);
    assert!(pid_alive(pid1), "h1's daemon ({pid1}) died from garbage");
    drop(idle);
}

/// Issue test 5: `mesh stop` ends the daemon but keeps the container's
/// interface; `mesh launch` with the same dirs brings back the same peer name,
/// the container in `mesh ps`, and traffic.
#[test]
fn restart_keeps_name_and_containers() {
    let Some(mut w) = World::new("restart_keeps_name_and_containers") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");
    let name1 = w.launch(&h1, &[]);
    w.launch(&h2, &["198.18.0.1"]);
    w.attach(&h1, &c1, "198.19.1.1/24");
    w.attach(&h2, &c2, "198.19.1.2/24");
    wait_ping(&c1, "198.19.1.2", PING_DEADLINE);
    wait_ping(&c2, "198.19.1.1", PING_DEADLINE);

    let pid = h1.daemon_pid().expect("h1 daemon pid");
    h1.mesh_ok(&["stop"]);
    wait_until(
        Duration::from_secs(15),
        "h1's daemon exits after mesh stop",
        || !pid_alive(pid),
    );
    let line = assert_one_line_error(&h1.mesh(&["status"]), "mesh status after mesh stop");
    assert!(
        line.to_lowercase().contains("not running"),
        "after stop, status should say mesh is not running: {line:?}"
    );
    assert_ethmesh(&c1, "198.19.1.1/24");

    let again = w.launch(&h1, &[]);
    assert_eq!(again, name1, "peer name changed across a restart");
    assert_ps_lists(&h1, &c1, "198.19.1.1/24");
    let restart = Duration::from_secs(30);
    wait_ping(&c1, "198.19.1.2", restart);
    wait_ping(&c2, "198.19.1.1", restart);
}

/// Issue test 6, without a daemon: `status`, `ps` and `attach` say mesh is not
/// running; `launch` by a non-root user says it needs root.
#[test]
fn cli_errors_without_daemon() {
    let Some(mut w) = World::new("cli_errors_without_daemon") else {
        return;
    };
    let h1 = w.add_host();
    let c1 = w.add_container("c1");

    for args in [
        vec!["status"],
        vec!["ps"],
        vec!["attach", "ip:198.19.1.1/24", c1.path.as_str()],
    ] {
        let what = format!("`mesh {}` with no daemon", args.join(" "));
        let line = assert_one_line_error(&h1.mesh(&args), &what);
        assert!(
            line.to_lowercase().contains("not running"),
            "{what} should say mesh is not running: {line:?}"
        );
    }
    assert!(
        c1.ethmesh_mac().is_none(),
        "attach without daemon made ethmesh"
    );

    let mesh = world_readable_mesh(&w.dir);
    let mesh = mesh.to_string_lossy();
    let out = run(
        &mut h1.command(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &mesh,
                "launch",
            ],
        ),
        LAUNCH_TIMEOUT,
    );
    let line = assert_one_line_error(&out, "`mesh launch` as uid 65534");
    assert!(
        line.to_lowercase().contains("root"),
        "launch without root should say it needs root: {line:?}"
    );
    assert!(!h1.daemon_running(), "a daemon started without root");
}

/// Issue test 6, with a daemon: malformed addresses and missing targets are
/// refused with one line each and attach nothing; a valid attach then works.
#[test]
fn cli_errors_with_daemon() {
    let Some(mut w) = World::new("cli_errors_with_daemon") else {
        return;
    };
    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    w.launch(&h1, &[]);

    let version = h1.mesh_ok(&["version"]);
    assert!(!version.trim().is_empty(), "`mesh version` printed nothing");

    for addr in [
        "ip:300.1.2.3/24",
        "ip:198.19.1.1/99",
        "ip:198.19.1.1/-1",
        "ip:not-an-address/24",
        "net:198.19.1.0/33",
        "300.1.2.3/24",
    ] {
        let out = h1.mesh(&["attach", addr, &c1.path]);
        assert_one_line_error(&out, &format!("`mesh attach {addr}`"));
    }
    assert!(c1.ethmesh_mac().is_none(), "a bad attach made ethmesh");

    let missing = w.missing_netns_path();
    let dead = dead_pid().to_string();
    for target in [missing.as_str(), dead.as_str()] {
        let out = h1.mesh(&["attach", "ip:198.19.1.1/24", target]);
        assert_one_line_error(&out, &format!("`mesh attach` to missing {target}"));
    }
    let out = h1.mesh(&["detach", &missing]);
    assert_one_line_error(&out, "`mesh detach` of a missing namespace");
    let ps = h1.ps();
    assert!(
        !ps.iter()
            .any(|e| e.id == c1.name || e.cidrs.iter().any(|c| c.starts_with("198.19."))),
        "failed attaches left entries in `mesh ps`: {ps:?}"
    );

    // The same daemon still attaches a good request.
    w.attach(&h1, &c1, "198.19.1.1/24");
    assert_ps_lists(&h1, &c1, "198.19.1.1/24");
}
