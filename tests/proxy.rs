//! The Docker API proxy (DESIGN §7) end to end: podman's Docker-compatible
//! API behind h1's proxy (`--docker-host`), driven by the real `docker`
//! CLI through `<run dir>/docker.sock`. `docker run -d` returns with the
//! container on the mesh (its `WEAVE_CIDR` subnet), `docker exec` (a
//! hijacked stream through the proxy) reaches a container on h2, the
//! container's resolv.conf names the mesh's DNS, `docker inspect` works,
//! `docker restart` attaches it again, and `docker rm -f` releases its
//! address. Also: `mesh env` and
//! `--restore`, a 400 for a malformed request (the proxy goes on), and a
//! 502 from a proxy whose Docker socket does not exist.

mod common;

use common::podman::Podman;
use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// The `docker` CLI talking to `sock`, with a private configuration.
fn docker(sock: &Path, config: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("docker");
    c.env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .env("DOCKER_CONFIG", config)
        .args(args);
    c
}

#[track_caller]
fn docker_ok(sock: &Path, config: &Path, args: &[&str]) -> String {
    let out = run(&mut docker(sock, config, args), Duration::from_secs(120));
    assert!(out.status.success(), "docker {args:?}: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One raw request to a unix socket; the whole answer.
fn raw_request(sock: &Path, request: &[u8]) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect to the proxy");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    s.write_all(request).expect("write request");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn docker_run_through_the_proxy_attaches_and_rm_releases() {
    let Some(mut w) = World::new("proxy") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    // Declared after the world, so dropped (containers gone) before it.
    let have = Command::new("docker").arg("--version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "the docker CLI is not installed"
    );
    let mut pm = Podman::new(w.dir.join("podman"), None);
    pm.serve_api();
    let range = ["--ipalloc-range", "198.19.0.0/16"];
    let upstream = format!("unix://{}", pm.socket().display());
    w.launch(&h1, &[&range[..], &["--docker-host", &upstream]].concat());
    let missing = format!("unix://{}", w.dir.join("no-docker.sock").display());
    w.launch(
        &h2,
        &[&range[..], &["--docker-host", &missing, "198.18.0.1"]].concat(),
    );
    let other = w.add_container("other");
    let other_ip = w.attach_net(&h2, &other, "198.19.8.0/24");

    let proxy = h1.run_dir.join("docker.sock");
    let config = w.dir.join("docker-config");
    std::fs::create_dir_all(&config).expect("mkdir docker config");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&proxy)
            .expect("the proxy's socket exists")
            .permissions(),
    );
    assert_eq!(mode & 0o007, 0, "docker.sock is open to others: {mode:o}");

    // `mesh env`, and back.
    let want = format!("unix://{}", proxy.display());
    let out = run(
        h1.command(MESH, &["env"])
            .env("DOCKER_HOST", "tcp://192.0.2.1:2375")
            .env_remove("ORIG_DOCKER_HOST"),
        CMD_TIMEOUT,
    );
    assert!(out.status.success(), "mesh env: {}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("export DOCKER_HOST={want} ORIG_DOCKER_HOST=tcp://192.0.2.1:2375")
    );
    let script = format!(
        "eval $({MESH} env); echo \"$DOCKER_HOST|$ORIG_DOCKER_HOST\"; \
         eval $({MESH} env --restore); echo \"${{DOCKER_HOST-unset}}|${{ORIG_DOCKER_HOST-unset}}\""
    );
    let out = run(
        h1.command("sh", &["-c", &script])
            .env_remove("DOCKER_HOST")
            .env_remove("ORIG_DOCKER_HOST"),
        CMD_TIMEOUT,
    );
    assert!(out.status.success(), "eval $(mesh env): {}", show(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{want}|\nunset|unset"),
        "mesh env then mesh env --restore"
    );

    // A malformed request: a 400 in Docker's JSON, and the proxy goes on.
    let answer = raw_request(&proxy, b"NONSENSE\r\nno colon\r\n\r\n");
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("\"message\""),
        "answer to a malformed request: {answer:?}"
    );
    // No Docker daemon behind h2's proxy: a 502 with a message.
    let out = run(
        &mut docker(&h2.run_dir.join("docker.sock"), &config, &["ps"]),
        Duration::from_secs(60),
    );
    assert!(
        !out.status.success() && show(&out).contains("cannot reach the Docker daemon"),
        "docker ps through h2's proxy (no daemon behind it): {}",
        show(&out)
    );

    // docker run -d: on the mesh when docker returns.
    docker_ok(
        &proxy,
        &config,
        &[
            "run",
            "-d",
            "--network",
            "none",
            "-e",
            "WEAVE_CIDR=net:198.19.8.0/24",
            "--name",
            "web",
            "localhost/bbox",
            "sleep",
            "300",
        ],
    );
    let (_, ip) = h1
        .attached("web")
        .expect("mesh ps on h1 lists web when docker run returns");
    assert!(ip.starts_with("198.19.8."), "web got {ip}");

    let seen = docker_ok(
        &proxy,
        &config,
        &["inspect", "-f", "{{.State.Running}} {{.Name}}", "web"],
    );
    assert!(
        seen.starts_with("true ") && seen.ends_with("web"),
        "docker inspect: {seen}"
    );
    // The create was rewritten: the mesh's DNS server and search domain,
    // the name as hostname. (Podman writes no resolv.conf for `--network
    // none` containers, which Docker does; when there is one, it must name
    // the mesh's server.)
    let dns = docker_ok(
        &proxy,
        &config,
        &[
            "inspect",
            "-f",
            "{{.HostConfig.Dns}} {{.HostConfig.DnsSearch}} {{.Config.Hostname}}",
            "web",
        ],
    );
    assert_eq!(dns, "[127.0.0.11] [mesh.local] web", "docker inspect web");
    let resolv = run(
        &mut docker(&proxy, &config, &["exec", "web", "cat", "/etc/resolv.conf"]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&resolv.stdout);
    assert!(
        !resolv.status.success()
            || (text.contains("nameserver 127.0.0.11") && text.contains("mesh.local")),
        "resolv.conf in web: {}",
        show(&resolv)
    );
    // Both ways across the hosts; the exec's output comes back through the
    // proxy's hijacked stream.
    wait_until(DEADLINE, "web pings other (docker exec)", || {
        run(
            &mut docker(
                &proxy,
                &config,
                &["exec", "web", "ping", "-c", "1", "-W", "1", &other_ip],
            ),
            Duration::from_secs(20),
        )
        .status
        .success()
    });
    let out = docker_ok(
        &proxy,
        &config,
        &["exec", "web", "ping", "-c", "1", "-W", "1", &other_ip],
    );
    assert!(out.contains("1 packets received"), "ping output: {out}");
    wait_ping(&other, &ip, DEADLINE);

    // A restart: a new namespace, attached again when docker returns.
    docker_ok(&proxy, &config, &["restart", "-t", "0", "web"]);
    let (_, ip) = h1
        .attached("web")
        .expect("mesh ps on h1 lists web when docker restart returns");
    assert!(ip.starts_with("198.19.8."), "web got {ip} after restart");
    wait_ping(&other, &ip, DEADLINE);

    // rm -f releases before docker returns (not 5 s later, when the daemon
    // would see the interface gone).
    docker_ok(&proxy, &config, &["rm", "-f", "web"]);
    assert!(
        h1.ps().iter().all(|e| e.id != "web"),
        "web still attached when docker rm -f returns"
    );
    let gone = docker_ok(&proxy, &config, &["ps", "-a", "-q"]);
    assert!(gone.is_empty(), "containers left: {gone}");

    // mesh stop takes the proxy's socket away.
    h1.mesh_ok(&["stop"]);
    assert!(!proxy.exists(), "docker.sock left after mesh stop");
}
