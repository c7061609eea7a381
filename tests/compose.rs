//! Docker Compose across two hosts (issue 18): the README's walk-through,
//! run with the very compose file it shows (`contrib/compose/docker-compose.yml`).
//! Each host has its own private dockerd behind its mesh daemon's Docker
//! proxy (`--docker-host`); Debian's `docker-compose` (1.29) talks to the
//! proxy (`DOCKER_HOST=unix://<run dir>/docker.sock`, as `mesh env` says).
//! `up -d web` on h1 and `up -d client` on h2 put both on the mesh in
//! 198.19.4.0/24 (their `WEAVE_CIDR`) by the time compose returns; the
//! client fetches web's page across the hosts by IP and by mesh name
//! (`web.mesh.local`) through `docker-compose exec`; compose makes no
//! Docker network (`network_mode: none`); `down` on both releases every
//! address (`mesh ps` empty).

mod common;

use common::docker::{Docker, IMAGE};
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);
const PROJECT: &str = "meshdemo";

/// The compose file the README shows.
fn compose_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/compose/docker-compose.yml")
}

/// `docker-compose -p meshdemo -f <file> ARGS...` against `host`'s proxy.
fn compose(host: &Host, d: &Docker, args: &[&str]) -> Command {
    let mut c = Command::new("docker-compose");
    c.env(
        "DOCKER_HOST",
        format!("unix://{}", host.run_dir.join("docker.sock").display()),
    )
    .env("DOCKER_CONFIG", d.dir.join("client"))
    .env("IMAGE", IMAGE)
    .env_remove("COMPOSE_PROJECT_NAME")
    .env_remove("COMPOSE_FILE")
    .args(["-p", PROJECT, "-f"])
    .arg(compose_file())
    .args(args);
    c
}

#[track_caller]
fn compose_run(host: &Host, d: &Docker, args: &[&str]) -> Output {
    run(&mut compose(host, d, args), Duration::from_secs(180))
}

#[track_caller]
fn compose_ok(host: &Host, d: &Docker, args: &[&str]) -> String {
    let out = compose_run(host, d, args);
    assert!(
        out.status.success(),
        "docker-compose {args:?} on {}: {}",
        host.name,
        show(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Docker networks beyond the three built-in ones.
fn extra_networks(d: &Docker) -> Vec<String> {
    d.ok(&["network", "ls", "--format", "{{.Name}}"])
        .lines()
        .map(str::to_string)
        .filter(|n| !["bridge", "host", "none"].contains(&n.as_str()))
        .collect()
}

#[test]
fn compose_project_across_two_hosts_through_the_proxy() {
    let Some(mut w) = World::new("compose") else {
        return;
    };
    let h1 = w.add_host();
    let h2 = w.add_host();
    let have = Command::new("docker-compose").arg("version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "docker-compose is not installed (scripts/test.sh installs it)"
    );
    // Declared after the world, so dropped (containers gone) before it.
    let d1 = Docker::new(w.dir.join("d1"));
    let d2 = Docker::new(w.dir.join("d2"));
    let range = ["--ipalloc-range", "198.19.0.0/16"];
    let up1 = format!("unix://{}", d1.socket().display());
    let up2 = format!("unix://{}", d2.socket().display());
    w.launch(&h1, &[&range[..], &["--docker-host", &up1]].concat());
    w.launch(
        &h2,
        &[&range[..], &["--docker-host", &up2, "198.18.0.1"]].concat(),
    );

    compose_ok(&h1, &d1, &["up", "-d", "web"]);
    let (_, web_ip) = h1
        .attached("web")
        .expect("mesh ps on h1 lists web when docker-compose up returns");
    assert!(web_ip.starts_with("198.19.4."), "web got {web_ip}");
    compose_ok(&h2, &d2, &["up", "-d", "client"]);
    let (_, client_ip) = h2
        .attached("client")
        .expect("mesh ps on h2 lists client when docker-compose up returns");
    assert!(client_ip.starts_with("198.19.4."), "client got {client_ip}");
    for (d, h) in [(&d1, &h1), (&d2, &h2)] {
        assert_eq!(
            extra_networks(d),
            Vec::<String>::new(),
            "compose made a Docker network on {}",
            h.name
        );
    }

    // Across the hosts, by IP and by name, through `docker-compose exec`.
    // (The README's command. No `wget -T`: busybox-static 1.35's wget
    // crashes with it; the deadline is the test's.)
    let fetch = |url: &str| {
        try_run(
            &mut compose(
                &h2,
                &d2,
                &["exec", "-T", "client", "wget", "-q", "-O", "-", url],
            ),
            Duration::from_secs(20),
        )
    };
    let fetched = |url: &str| {
        let out = fetch(url)?;
        if String::from_utf8_lossy(&out.stdout).contains("hello from web") {
            Ok(())
        } else {
            Err(show(&out))
        }
    };
    let by_ip = format!("http://{web_ip}:8080/");
    wait_for(DEADLINE, "client fetches web's page by IP", || {
        fetched(&by_ip)
    });
    let by_name = "http://web.mesh.local:8080/";
    wait_for(DEADLINE, "client fetches web's page by name", || {
        fetched(by_name)
    });
    let out = fetch(by_name).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "hello from web",
        "wget {by_name}: {}",
        show(&out)
    );

    // down releases everything, on both hosts.
    compose_ok(&h2, &d2, &["down"]);
    compose_ok(&h1, &d1, &["down"]);
    for h in [&h1, &h2] {
        assert!(h.ps().is_empty(), "mesh ps on {}: {:?}", h.name, h.ps());
    }
    for d in [&d1, &d2] {
        assert!(d.ok(&["ps", "-aq"]).is_empty(), "containers left");
    }
}

/// The README shows the compose file the test runs (its comments aside).
#[test]
fn readme_shows_the_compose_file() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let shown: Vec<&str> = readme
        .lines()
        .skip_while(|l| *l != "### Docker Compose")
        .skip_while(|l| *l != "```yaml")
        .skip(1)
        .take_while(|l| *l != "```")
        .collect();
    let file = std::fs::read_to_string(compose_file()).expect("the compose file");
    let file: Vec<&str> = file.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(
        !shown.is_empty(),
        "no ```yaml block under ### Docker Compose in README.md"
    );
    assert_eq!(
        shown,
        file,
        "README.md's compose file differs from {}",
        compose_file().display()
    );
}
