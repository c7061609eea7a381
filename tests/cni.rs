//! The CNI plugin (DESIGN §7) end to end: the `mesh` binary called as a
//! runtime calls it (`CNI_*` variables, the network configuration on
//! stdin, from the root namespace, talking to each host's daemon over the
//! `socket` of its configuration) attaches container namespaces on two
//! hosts, which then reach each other by IP and by name; CHECK, DEL (twice:
//! it must be idempotent), VERSION, and the specification's JSON errors for
//! bad input, with nothing attached by a failed ADD.

mod common;

use common::podman::Podman;
use common::*;
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// One plugin call: `mesh` with `CNI_COMMAND=command`, `env`, and `conf`
/// on stdin. Returns the output and its stdout parsed as JSON (Null when
/// empty).
fn cni(command: &str, env: &[(&str, &str)], conf: &str) -> (Output, Value) {
    let mut cmd = Command::new(MESH);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_PATH", "/usr/lib/cni")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in ["MESH_RUN_DIR", "MESH_DATA_DIR", "MESH_CIDR", "WEAVE_CIDR"] {
        cmd.env_remove(v);
    }
    let mut child = cmd.spawn().expect("spawn mesh as a CNI plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.as_bytes())
        .expect("write conf");
    let status = wait_child(&mut child, Duration::from_secs(150))
        .unwrap_or_else(|| panic!("CNI {command} did not finish"));
    let mut out = Output {
        status,
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_end(&mut out.stdout)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_end(&mut out.stderr)
        .expect("read stderr");
    let v = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("CNI {command} printed no JSON ({e}): {}", show(&out)))
    };
    (out, v)
}

fn conf(host: &Host, extra: &str) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"mesh","type":"mesh","socket":"{}"{extra}}}"#,
        host.run_dir.join("mesh.sock").display()
    )
}

/// The CNI error a failed call printed: its code, after checking the exit
/// status and the message.
fn error_code(what: &str, out: &Output, v: &Value) -> u64 {
    assert!(!out.status.success(), "{what} succeeded: {}", show(out));
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no msg in {v}"
    );
    v["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: no code in {v}"))
}

/// Two hosts sharing the range 198.19.0.0/16, h2 launched naming h1.
fn two_hosts(w: &mut World) -> (Host, Host) {
    let h1 = w.add_host();
    let h2 = w.add_host();
    let range = ["--ipalloc-range", "198.19.0.0/16"];
    w.launch(&h1, &range);
    w.launch(&h2, &[&range[..], &["198.18.0.1"]].concat());
    (h1, h2)
}

#[test]
fn cni_add_check_del_across_two_hosts() {
    let Some(mut w) = World::new("cni") else {
        return;
    };
    let (h1, h2) = two_hosts(&mut w);
    let c1 = w.add_container("c1");
    let c2 = w.add_container("c2");

    // VERSION needs no configuration.
    let (out, v) = cni("VERSION", &[], "");
    assert!(out.status.success(), "VERSION: {}", show(&out));
    assert!(
        v["supportedVersions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s == "1.0.0")),
        "VERSION printed {v}"
    );

    // ADD on h1, the subnet from the configuration, the name from CNI_ARGS
    // as podman passes it.
    let conf1 = conf(&h1, r#","subnet":"net:198.19.5.0/24""#);
    let env1 = [
        ("CNI_CONTAINERID", "c1c1c1c1c1c1c1c1c1c1"),
        ("CNI_NETNS", c1.path.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web"),
    ];
    let (out, r1) = cni("ADD", &env1, &conf1);
    assert!(out.status.success(), "ADD c1: {}", show(&out));
    assert_eq!(r1["cniVersion"], "1.0.0", "{r1}");
    assert_eq!(r1["interfaces"][0]["name"], "eth0", "{r1}");
    assert_eq!(r1["interfaces"][0]["sandbox"], c1.path.as_str(), "{r1}");
    let mac1 = c1.mac_of("eth0").expect("c1 has eth0 after ADD");
    assert_eq!(r1["interfaces"][0]["mac"], mac1.as_str(), "{r1}");
    let cidr1 = r1["ips"][0]["address"]
        .as_str()
        .expect("an address")
        .to_string();
    assert!(
        cidr1.starts_with("198.19.5.") && cidr1.ends_with("/24"),
        "{r1}"
    );
    assert_eq!(r1["ips"][0]["interface"], 0, "{r1}");
    assert_eq!(r1["dns"]["nameservers"][0], "127.0.0.11", "{r1}");
    assert_eq!(r1["dns"]["search"][0], "mesh.local", "{r1}");
    let ip1 = cidr1.split('/').next().unwrap_or_default().to_string();
    assert!(
        h1.ps()
            .iter()
            .any(|e| e.id == "web" && e.cidrs.contains(&cidr1)),
        "mesh ps on h1 does not show web {cidr1}"
    );

    // ADD on h2: the subnet from WEAVE_CIDR in CNI_ARGS, no runtime name
    // (so the ID's first 12 characters), an older cniVersion.
    let conf2 = conf(&h2, "").replace("1.0.0", "0.4.0");
    let env2 = [
        ("CNI_CONTAINERID", "c2c2c2c2c2c2c2c2c2c2"),
        ("CNI_NETNS", c2.path.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "IgnoreUnknown=1;WEAVE_CIDR=net:198.19.5.0/24"),
    ];
    let (out, r2) = cni("ADD", &env2, &conf2);
    assert!(out.status.success(), "ADD c2: {}", show(&out));
    assert_eq!(r2["cniVersion"], "0.4.0", "{r2}");
    assert_eq!(r2["ips"][0]["version"], "4", "{r2}");
    let cidr2 = r2["ips"][0]["address"]
        .as_str()
        .expect("an address")
        .to_string();
    assert!(cidr2.starts_with("198.19.5.") && cidr2 != cidr1, "{r2}");
    assert!(
        h2.ps().iter().any(|e| e.id == "c2c2c2c2c2c2"),
        "mesh ps on h2 does not show c2c2c2c2c2c2"
    );

    // Across hosts by IP, and by name through the mesh's DNS.
    wait_ping(&c2, &ip1, DEADLINE);
    wait_until(DEADLINE, "c2 resolves web.mesh.local", || {
        let out = c2.exec(
            "dig",
            &[
                "+short",
                "+time=1",
                "+tries=1",
                "@127.0.0.11",
                "web.mesh.local",
            ],
            Duration::from_secs(10),
        );
        String::from_utf8_lossy(&out.stdout).trim() == ip1
    });

    // CHECK: attached and whole.
    let (out, _) = cni("CHECK", &env1, &conf1);
    assert!(out.status.success(), "CHECK c1: {}", show(&out));

    // Bad input: one JSON error each, and nothing attached.
    let c3 = w.add_container("c3");
    let env3 = [
        ("CNI_CONTAINERID", "c3c3c3c3c3c3c3c3"),
        ("CNI_NETNS", c3.path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let (out, v) = cni("ADD", &env3, &conf(&h1, r#","subnet":"net:198.19.5.0/33""#));
    assert_eq!(error_code("ADD with a bad subnet", &out, &v), 7, "{v}");
    let (out, v) = cni("ADD", &env3, "{not json");
    assert_eq!(error_code("ADD with broken JSON", &out, &v), 6, "{v}");
    let (out, v) = cni("ADD", &env3, &conf(&h1, "").replace("1.0.0", "0.1.0"));
    assert_eq!(error_code("ADD with cniVersion 0.1.0", &out, &v), 1, "{v}");
    let (out, v) = cni("ADD", &env3[..2], &conf(&h1, ""));
    assert_eq!(error_code("ADD without CNI_IFNAME", &out, &v), 4, "{v}");
    let nobody = w.dir.join("nobody.sock");
    let no_daemon = format!(
        r#"{{"cniVersion":"1.0.0","name":"mesh","type":"mesh","socket":"{}"}}"#,
        nobody.display()
    );
    let (out, v) = cni("ADD", &env3, &no_daemon);
    assert_eq!(error_code("ADD with no daemon", &out, &v), 11, "{v}");
    // DEL with the daemon down succeeds: the daemon releases what vanished
    // while it was stopped.
    let (out, _) = cni("DEL", &env3, &no_daemon);
    assert!(out.status.success(), "DEL with no daemon: {}", show(&out));
    let (out, v) = cni("STATUS", &[], &no_daemon);
    assert_eq!(error_code("STATUS with no daemon", &out, &v), 50, "{v}");
    let (out, _) = cni("STATUS", &[], &conf1);
    assert!(out.status.success(), "STATUS: {}", show(&out));
    assert!(c3.mac_of("eth0").is_none(), "a failed ADD left eth0 in c3");
    assert_eq!(h1.ps().len(), 1, "a failed ADD attached something on h1");

    // DEL: the interface goes, the address is released; again: still fine.
    let (out, _) = cni("DEL", &env1, &conf1);
    assert!(out.status.success(), "DEL c1: {}", show(&out));
    assert!(c1.mac_of("eth0").is_none(), "eth0 still in c1 after DEL");
    assert!(
        h1.ps().is_empty(),
        "mesh ps on h1 still lists web after DEL"
    );
    let (out, _) = cni("DEL", &env1, &conf1);
    assert!(out.status.success(), "second DEL c1: {}", show(&out));
    let (out, v) = cni("CHECK", &env1, &conf1);
    assert_eq!(error_code("CHECK after DEL", &out, &v), 3, "{v}");
    // DEL of a container whose namespace is gone, by its ID.
    let gone = [
        ("CNI_CONTAINERID", "c2c2c2c2c2c2c2c2c2c2"),
        ("CNI_NETNS", ""),
        ("CNI_IFNAME", "eth0"),
    ];
    let (out, _) = cni("DEL", &gone, &conf2);
    assert!(out.status.success(), "DEL c2 by ID: {}", show(&out));
    assert!(h2.ps().is_empty(), "mesh ps on h2 still lists c2 after DEL");

    // The address web held is free again: a new ADD in that subnet works.
    let (out, r) = cni("ADD", &env3, &conf(&h1, r#","subnet":"net:198.19.5.0/24""#));
    assert!(out.status.success(), "ADD c3: {}", show(&out));
    assert!(r["ips"][0]["address"].as_str().is_some(), "{r}");
}

/// podman's CNI backend with `"type": "mesh"`: `podman run --network mesh`
/// attaches the container through the plugin; it reaches a container on
/// another host, podman sees its address and MAC and the mesh's DNS, and
/// `podman rm` releases it.
#[test]
fn podman_runs_containers_on_the_mesh_network() {
    let Some(mut w) = World::new("cni-podman") else {
        return;
    };
    let (h1, h2) = two_hosts(&mut w);
    let other = w.add_container("other");
    let other_ip = w.attach_net(&h2, &other, "198.19.7.0/24");
    let plugin = format!(
        r#"{{"type":"mesh","socket":"{}","subnet":"net:198.19.7.0/24"}}"#,
        h1.run_dir.join("mesh.sock").display()
    );
    let pm = Podman::new(w.dir.join("podman"), Some(&plugin));

    pm.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "mesh",
        "localhost/bbox",
        "sleep",
        "300",
    ]);
    let (entry, ip) = h1
        .attached("web")
        .expect("mesh ps on h1 lists the podman container web");
    assert!(ip.starts_with("198.19.7."), "web got {ip}");
    let seen = pm.ok(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.mesh.IPAddress}} {{.NetworkSettings.Networks.mesh.MacAddress}}",
        "web",
    ]);
    assert_eq!(seen, format!("{ip} {}", entry.mac), "podman inspect");
    let resolv = pm.ok(&["exec", "web", "cat", "/etc/resolv.conf"]);
    assert!(
        resolv.contains("nameserver 127.0.0.11") && resolv.contains("mesh.local"),
        "resolv.conf in web: {resolv}"
    );
    // Across hosts, both ways.
    wait_ping(&other, &ip, DEADLINE);
    wait_until(DEADLINE, "web pings other", || {
        run(
            &mut pm.cmd(&["exec", "web", "ping", "-c", "1", "-W", "1", &other_ip]),
            Duration::from_secs(10),
        )
        .status
        .success()
    });

    pm.ok(&["rm", "--force", "--time", "0", "web"]);
    assert!(
        h1.ps().iter().all(|e| e.id != "web"),
        "web still attached after podman rm"
    );
}
