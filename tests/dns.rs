//! Names (issue 5): a container on one host resolves the name of a container
//! on another, forward and reverse, through the DNS the daemon serves inside
//! every container at 127.0.0.11; names of several containers answer
//! together; a detached container's name disappears everywhere; other names
//! are forwarded to the host's upstream (a dnsmasq in a test namespace), and
//! an upstream that is gone gives SERVFAIL, not a hang.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// `dig` inside a container against the mesh's DNS; the `+short` answer
/// lines, sorted, and the status word.
fn dig(c: &Container, args: &[&str]) -> (Vec<String>, String) {
    let mut all = vec!["@127.0.0.11", "+time=3", "+tries=1"];
    all.extend_from_slice(args);
    let out = c.exec("dig", &all, Duration::from_secs(15));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|r| r.split(',').next())
        .unwrap_or("")
        .to_string();
    let mut answers: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(String::from))
        .collect();
    answers.sort();
    (answers, status)
}

fn attach_named(h: &Host, c: &Container) -> String {
    let out = h.mesh_timeout(&["attach", "--name", &c.name, &c.path], DEADLINE);
    assert!(out.status.success(), "attach {}: {}", c.name, show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .and_then(|l| l.split('/').next())
        .unwrap_or_else(|| panic!("attach printed {text:?}"))
        .to_string()
}

#[test]
fn names_resolve_across_hosts_forward_and_fail_cleanly() {
    let Some(mut w) = World::new("dns") else {
        return;
    };
    let hosts: Vec<Host> = (0..3).map(|_| w.add_host()).collect();
    let upstream = w.add_host();
    // The upstream: a dnsmasq on h4 that knows one outside name.
    let conf = w.dir.join("resolv.conf");
    std::fs::write(&conf, format!("nameserver {}\n", upstream.ip)).expect("resolv.conf");
    let pidfile = w.dir.join("dnsmasq.pid");
    let out = run(
        &mut upstream.command(
            "dnsmasq",
            &[
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                &format!("--listen-address={}", upstream.ip),
                "--address=/outside.test/198.18.7.7",
                &format!("--pid-file={}", pidfile.display()),
                "--user=root",
            ],
        ),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "dnsmasq: {}", show(&out));
    let dnsmasq_pid: i32 = wait_for(Duration::from_secs(10), "dnsmasq pid file", || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| "no pid yet".to_string())
    });
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            terminate(self.0);
        }
    }
    let mut dnsmasq = Some(Kill(dnsmasq_pid));

    let conf_s = conf.to_string_lossy().into_owned();
    for (i, h) in hosts.iter().enumerate() {
        let mut args = vec!["--ipalloc-range", "198.19.0.0/16", "--resolv-conf", &conf_s];
        if i > 0 {
            args.push("198.18.0.1");
        }
        w.launch(h, &args);
    }
    let c1 = w.add_container("c1");
    let web_a = w.add_container("web");
    let web_b = w.add_container("web-b");
    attach_named(&hosts[0], &c1);
    let ip_a = attach_named(&hosts[2], &web_a);
    // A second container named "web", on h2.
    let out = hosts[1].mesh_timeout(&["attach", "--name", "web", &web_b.path], DEADLINE);
    let err = String::from_utf8_lossy(&out.stderr);
    let ip_b = if out.status.success() {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.split('/').next())
            .expect("cidr")
            .to_string()
    } else {
        panic!("attach web on h2: {err}");
    };

    // A and PTR across hosts; case-insensitive; single label.
    wait_until(DEADLINE, "c1 resolves web to both", || {
        let mut want = vec![ip_a.clone(), ip_b.clone()];
        want.sort();
        dig(&c1, &["web.mesh.local", "A"]).0 == want
    });
    assert_eq!(dig(&c1, &["WEB.Mesh.Local", "A"]).0.len(), 2);
    assert_eq!(dig(&c1, &["web", "A"]).0.len(), 2);
    let (ptr, _) = dig(&c1, &["-x", &ip_a]);
    assert_eq!(ptr, vec!["web.mesh.local.".to_string()], "PTR of {ip_a}");
    let (none, status) = dig(&c1, &["nobody.mesh.local", "A"]);
    assert!(none.is_empty() && status == "NXDOMAIN", "{none:?} {status}");
    // The CLI sees the same.
    let looked = hosts[0].mesh_ok(&["dns-lookup", "web"]);
    assert_eq!(looked.lines().count(), 2, "dns-lookup web: {looked}");
    let listing = hosts[0].mesh_ok(&["status", "dns"]);
    assert!(
        listing.contains(&ip_a) && listing.contains(&ip_b),
        "{listing}"
    );

    // Names added by hand, and removed.
    hosts[0].mesh_ok(&["dns-add", "198.19.250.1", "-h", "db.example.test."]);
    wait_until(DEADLINE, "db.example.test resolves", || {
        dig(&c1, &["db.example.test", "A"]).0 == vec!["198.19.250.1".to_string()]
    });
    hosts[0].mesh_ok(&["dns-remove", "198.19.250.1", "-h", "db.example.test."]);
    // A second name for an attached container, by TARGET.
    hosts[2].mesh_ok(&["dns-add", "-h", "alias.example.test.", &web_a.path]);
    wait_until(DEADLINE, "the alias resolves to web on h3", || {
        dig(&c1, &["alias.example.test", "A"]).0 == vec![ip_a.clone()]
    });

    // Detaching web on h3 removes its name everywhere.
    hosts[2].mesh_ok(&["detach", &web_a.path]);
    wait_until(DEADLINE, "only web on h2 is left", || {
        dig(&c1, &["web.mesh.local", "A"]).0 == vec![ip_b.clone()]
    });

    // Other names go upstream.
    let (outside, status) = dig(&c1, &["www.outside.test", "A"]);
    assert_eq!(
        outside,
        vec!["198.18.7.7".to_string()],
        "forwarded: {status}"
    );
    // Upstream gone: SERVFAIL, within dig's own bound.
    drop(dnsmasq.take());
    wait_until(DEADLINE, "SERVFAIL with the upstream gone", || {
        dig(&c1, &["other.outside.test", "A"]).1 == "SERVFAIL"
    });

    // A table larger than one gossip message (2,500 entries, ~90 kB) reaches a peer
    // that joins afterwards: the full state travels in parts.
    let ips: Vec<String> = (0..2500u32)
        .map(|i| std::net::Ipv4Addr::from(0xc613_c000 + i).to_string())
        .collect();
    let mut args: Vec<&str> = vec!["dns-add"];
    args.extend(ips.iter().map(String::as_str));
    args.extend(["-h", "bulk.example.test."]);
    hosts[0].mesh_ok(&args);
    let late = w.add_host();
    w.launch(
        &late,
        &[
            "--ipalloc-range",
            "198.19.0.0/16",
            "--resolv-conf",
            &conf_s,
            "198.18.0.1",
        ],
    );
    wait_until(DEADLINE, "the late peer knows all 2,500 entries", || {
        late.mesh(&["dns-lookup", "bulk.example.test."])
            .stdout
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count()
            == 2500
    });

    // mesh run: its resolv.conf points at the mesh's DNS, and names resolve
    // by the search domain.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &hosts[0].ns,
            MESH,
            "run",
            "--name",
            "runner",
            "--",
        ])
        .args(["sh", "-c", "cat /etc/resolv.conf; dig +short +search web"])
        .env("MESH_RUN_DIR", &hosts[0].run_dir)
        .env("MESH_DATA_DIR", &hosts[0].data_dir)
        .stdin(Stdio::null())
        .output()
        .expect("mesh run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mesh run: {}", show(&out));
    assert!(text.contains("nameserver 127.0.0.11"), "{text}");
    assert!(text.contains("search mesh.local"), "{text}");
    assert!(text.lines().any(|l| l.trim() == ip_b), "{text}");
}
