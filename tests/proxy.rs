//! The Docker API proxy (DESIGN §7) end to end, driven by the real `docker`
//! CLI through h1's `<run dir>/docker.sock`, in front of two engines
//! (`--docker-host`): podman's Docker-compatible API, and the real Docker
//! engine (a private `dockerd`, `tests/common/docker.rs`). One body runs
//! against each: `docker run -d` returns with the container on the mesh
//! (its `WEAVE_CIDR` subnet), the create was rewritten for the mesh's DNS
//! (Docker writes it into the container's resolv.conf, and a mesh name
//! resolves through it), `docker exec` (a hijacked stream through the
//! proxy, stdin included) reaches a container on h2, `docker cp` both
//! ways, `docker stop` detaches at once (also a `--rm` container, which
//! the engine removes as it stops) and `docker start` attaches again, as
//! does `docker restart`; `docker run -a stdout`, `docker logs`, `docker
//! run -i` and `docker attach` with stdin piped through the proxy; `docker
//! rm -f` releases the address. Also: `mesh env` and `--restore`, a 400
//! for a malformed request (the proxy goes on), a 502 from a proxy whose
//! Docker socket does not exist. And `--proxy-group`: the socket is the
//! group's, mode 0660, and a user of that group (not root) uses it; a bad
//! group name fails the launch with one line.

mod common;

use common::docker::{Docker, IMAGE};
use common::podman::Podman;
use common::*;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// The engine behind h1's proxy.
enum Engine {
    /// podman's Docker-compatible API.
    Podman(Podman),
    /// A private dockerd.
    Docker(Docker),
}

impl Engine {
    /// The engine's own API socket (the proxy's `--docker-host`).
    fn socket(&self) -> PathBuf {
        match self {
            Engine::Podman(p) => p.socket(),
            Engine::Docker(d) => d.socket(),
        }
    }

    /// The busybox image imported into it.
    fn image(&self) -> &'static str {
        match self {
            Engine::Podman(_) => "localhost/bbox",
            Engine::Docker(_) => IMAGE,
        }
    }

    /// Whether a `--network none` container gets a resolv.conf from the
    /// engine (Docker writes one; podman does not).
    fn writes_resolv_conf(&self) -> bool {
        matches!(self, Engine::Docker(_))
    }
}

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

/// `printf INPUT | docker ARGS...` (stdin piped through the proxy), which
/// must succeed; its stdout, trimmed.
#[track_caller]
fn docker_stdin_ok(sock: &Path, config: &Path, input: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "printf '%s' \"$INPUT\" | docker \"$@\"", "sh"])
        .args(args)
        .env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .env("DOCKER_CONFIG", config)
        .env("INPUT", input);
    let out = run(&mut cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "printf {input:?} | docker {args:?}: {}",
        show(&out)
    );
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

fn have_docker_cli() {
    let have = Command::new("docker").arg("--version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "the docker CLI is not installed"
    );
}

#[test]
fn docker_run_through_the_proxy_attaches_and_rm_releases() {
    let Some(mut w) = World::new("proxy") else {
        return;
    };
    have_docker_cli();
    // Declared after the world, so dropped (containers gone) before it.
    let mut pm = Podman::new(w.dir.join("podman"), None);
    pm.serve_api();
    end_to_end(&mut w, &Engine::Podman(pm));
}

#[test]
fn docker_engine_through_the_proxy_attaches_and_rm_releases() {
    let Some(mut w) = World::new("proxy-dockerd") else {
        return;
    };
    have_docker_cli();
    let engine = Engine::Docker(Docker::new(w.dir.join("d")));
    end_to_end(&mut w, &engine);
}

/// The checks both engines go through: h1's proxy in front of `engine`,
/// h2's in front of nothing, a container `other` on h2.
fn end_to_end(w: &mut World, engine: &Engine) {
    let h1 = w.add_host();
    let h2 = w.add_host();
    let range = ["--ipalloc-range", "198.19.0.0/16"];
    let upstream = format!("unix://{}", engine.socket().display());
    w.launch(&h1, &[&range[..], &["--docker-host", &upstream]].concat());
    let missing = format!("unix://{}", w.dir.join("no-docker.sock").display());
    w.launch(
        &h2,
        &[&range[..], &["--docker-host", &missing, "198.18.0.1"]].concat(),
    );
    let other = w.add_container("other");
    let other_ip = w.attach_net(&h2, &other, "198.19.8.0/24");
    let image = engine.image();

    let proxy = h1.run_dir.join("docker.sock");
    let config = w.dir.join("docker-config");
    std::fs::create_dir_all(&config).expect("mkdir docker config");
    let meta = std::fs::metadata(&proxy).expect("the proxy's socket exists");
    let mode = meta.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "docker.sock without --proxy-group");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "docker.sock's owner");

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
            image,
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
    // the name as hostname.
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
    // Docker writes them into the container's resolv.conf (podman writes
    // none for `--network none` containers), and a mesh name resolves
    // through it: by the resolver's own server, and by the search domain.
    let resolv = run(
        &mut docker(&proxy, &config, &["exec", "web", "cat", "/etc/resolv.conf"]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&resolv.stdout);
    let named = text.contains("nameserver 127.0.0.11") && text.contains("search mesh.local");
    if engine.writes_resolv_conf() {
        assert!(
            resolv.status.success() && named,
            "resolv.conf in web: {}",
            show(&resolv)
        );
    } else {
        assert!(
            !resolv.status.success() || named,
            "resolv.conf in web: {}",
            show(&resolv)
        );
    }
    let lookup: &[&str] = if engine.writes_resolv_conf() {
        &["exec", "web", "nslookup", "other.mesh.local"]
    } else {
        &["exec", "web", "nslookup", "other.mesh.local", "127.0.0.11"]
    };
    wait_until(DEADLINE, "web resolves other.mesh.local", || {
        let out = run(
            &mut docker(&proxy, &config, lookup),
            Duration::from_secs(20),
        );
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&other_ip)
    });
    // Both ways across the hosts; the exec's output comes back through the
    // proxy's hijacked stream. By name (the search domain) where there
    // is a resolv.conf.
    let target = if engine.writes_resolv_conf() {
        "other"
    } else {
        other_ip.as_str()
    };
    wait_until(DEADLINE, "web pings other (docker exec)", || {
        run(
            &mut docker(
                &proxy,
                &config,
                &["exec", "web", "ping", "-c", "1", "-W", "1", target],
            ),
            Duration::from_secs(20),
        )
        .status
        .success()
    });
    let out = docker_ok(
        &proxy,
        &config,
        &["exec", "web", "ping", "-c", "1", "-W", "1", target],
    );
    assert!(
        out.contains("1 packets received") && out.contains(&other_ip),
        "ping output: {out}"
    );
    wait_ping(&other, &ip, DEADLINE);
    // stdin through an exec's hijacked stream, and back.
    let echoed = docker_stdin_ok(
        &proxy,
        &config,
        "through exec\n",
        &["exec", "-i", "web", "cat"],
    );
    assert_eq!(echoed, "through exec", "docker exec -i web cat");

    // docker cp both ways: a request body (a tar, streamed) through the
    // proxy, and an answer's.
    let file = w.dir.join("cp-in.bin");
    let data = random_bytes(1 << 20);
    std::fs::write(&file, &data).expect("write cp-in.bin");
    docker_ok(
        &proxy,
        &config,
        &["cp", &file.display().to_string(), "web:/in.bin"],
    );
    let back = w.dir.join("cp-out.bin");
    docker_ok(
        &proxy,
        &config,
        &["cp", "web:/in.bin", &back.display().to_string()],
    );
    assert!(
        std::fs::read(&back).is_ok_and(|b| b == data),
        "docker cp in and out again changed the file"
    );

    // stop: detached when docker returns; start: attached again.
    docker_ok(&proxy, &config, &["stop", "-t", "0", "web"]);
    assert!(
        h1.ps().iter().all(|e| e.id != "web"),
        "web still attached when docker stop returns"
    );
    docker_ok(&proxy, &config, &["start", "web"]);
    let (_, ip) = h1
        .attached("web")
        .expect("mesh ps on h1 lists web when docker start returns");
    assert!(ip.starts_with("198.19.8."), "web got {ip} after start");
    pinged_then_pings(&proxy, &config, &other, &ip, target);

    // A restart: a new namespace, attached again when docker returns.
    docker_ok(&proxy, &config, &["restart", "-t", "0", "web"]);
    let (_, ip) = h1
        .attached("web")
        .expect("mesh ps on h1 lists web when docker restart returns");
    assert!(ip.starts_with("198.19.8."), "web got {ip} after restart");
    pinged_then_pings(&proxy, &config, &other, &ip, target);

    // A container run with --rm: stop removes it too (the engine does,
    // right after it stops); its address is released when docker stop
    // returns all the same.
    docker_ok(
        &proxy,
        &config,
        &[
            "run",
            "-d",
            "--rm",
            "--network",
            "none",
            "-e",
            "WEAVE_CIDR=net:198.19.8.0/24",
            "--name",
            "brief",
            image,
            "sleep",
            "300",
        ],
    );
    assert!(
        h1.attached("brief").is_some(),
        "brief not attached when docker run returns"
    );
    docker_ok(&proxy, &config, &["stop", "-t", "0", "brief"]);
    assert!(
        h1.ps().iter().all(|e| e.id != "brief"),
        "brief (--rm) still attached when docker stop returns"
    );

    // Streams: `docker run` attached to stdout (attach, wait and start
    // through the proxy), then its logs.
    let said = docker_ok(
        &proxy,
        &config,
        &[
            "run",
            "-a",
            "stdout",
            "--network",
            "none",
            "--name",
            "said",
            image,
            "echo",
            "said hi",
        ],
    );
    assert_eq!(said, "said hi", "docker run -a stdout");
    let logs = docker_ok(&proxy, &config, &["logs", "said"]);
    assert_eq!(logs, "said hi", "docker logs said");
    // stdin piped into `docker run -i`, through the proxy, and back.
    let echoed = docker_stdin_ok(
        &proxy,
        &config,
        "piped in\n",
        &["run", "-i", "--rm", "--network", "none", image, "cat"],
    );
    assert_eq!(echoed, "piped in", "docker run -i cat");
    // `docker attach` to a shell that reads its stdin.
    docker_ok(
        &proxy,
        &config,
        &[
            "run",
            "-d",
            "-i",
            "--network",
            "none",
            "--name",
            "shell",
            image,
            "sh",
        ],
    );
    let answer = attach_and_type(
        &proxy,
        &config,
        "shell",
        "echo attached $((6*7))\n",
        "attached 42",
    );
    assert_eq!(answer, "attached 42", "docker attach shell");

    // rm -f releases before docker returns (not 5 s later, when the daemon
    // would see the interface gone).
    docker_ok(&proxy, &config, &["rm", "-f", "web", "said", "shell"]);
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

/// `docker attach NAME` through the proxy to a shell: types `input` on its
/// stdin and keeps stdin open until `want` comes back on its stdout, then
/// types `exit` and waits for the CLI to end with the container. (With
/// Docker, the end of stdin ends neither the container, which was not
/// started with `StdinOnce`, nor the attach; and output of a shell that
/// exits as its stdin ends may not reach the client.) What came back,
/// trimmed.
#[track_caller]
fn attach_and_type(sock: &Path, config: &Path, name: &str, input: &str, want: &str) -> String {
    use std::io::BufRead;
    let mut child = docker(sock, config, &["attach", name])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start docker attach");
    let mut stdin = child.stdin.take().expect("attach's stdin");
    let stdout = child.stdout.take().expect("attach's stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    stdin
        .write_all(input.as_bytes())
        .expect("type into docker attach");
    let deadline = std::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = line.trim() == want;
                seen.push(line);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = stdin.write_all(b"exit\n");
    drop(stdin);
    let status = wait_child(&mut child, DEADLINE);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert!(
        status.is_some(),
        "docker attach {name} did not end with the shell"
    );
    seen.join("\n").trim().to_string()
}

/// After web came back (a new namespace, a new MAC at the same address):
/// `other` pings web first (its neighbour entry named web's old MAC: the
/// gratuitous ARP of the attach must have replaced it), then web pings
/// `target` (docker exec through the proxy).
#[track_caller]
fn pinged_then_pings(proxy: &Path, config: &Path, other: &Container, ip: &str, target: &str) {
    wait_ping(other, ip, DEADLINE);
    wait_until(DEADLINE, "web pings other again (docker exec)", || {
        run(
            &mut docker(
                proxy,
                config,
                &["exec", "web", "ping", "-c", "1", "-W", "1", target],
            ),
            Duration::from_secs(20),
        )
        .status
        .success()
    });
}

/// A group made for one test (`groupadd`), deleted when dropped.
struct TestGroup {
    name: String,
    gid: u32,
}

impl TestGroup {
    fn new(name: &str) -> TestGroup {
        run_ok("groupadd", &[name]);
        let line = run_ok("getent", &["group", name]);
        let gid = line
            .split(':')
            .nth(2)
            .and_then(|g| g.trim().parse().ok())
            .unwrap_or_else(|| panic!("getent group {name}: {line:?}"));
        TestGroup {
            name: name.to_string(),
            gid,
        }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = try_run(
            Command::new("groupdel").arg(&self.name),
            Duration::from_secs(30),
        );
    }
}

/// `docker ps` through `sock` as user 65534 (not root) with only the
/// supplementary groups `groups` (none when empty).
fn docker_ps_as_nobody(sock: &Path, config: &Path, groups: &[u32]) -> std::process::Output {
    let groups = groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    if groups.is_empty() {
        cmd.arg("--clear-groups");
    } else {
        cmd.arg(format!("--groups={groups}"));
    }
    cmd.args(["docker", "ps", "-a", "--format", "{{.Names}}"])
        .env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .env("DOCKER_CONFIG", config)
        .env("HOME", config);
    run(&mut cmd, Duration::from_secs(60))
}

/// `mesh launch --proxy-group NAME`: the proxy's socket is that group's,
/// mode 0660, and a user of the group who is not root runs `docker ps`
/// through it (one outside it cannot). A group that does not exist fails
/// the launch with one line, and nothing is left running.
#[test]
fn proxy_group_opens_the_socket_to_the_group() {
    let Some(mut w) = World::new("proxy-group") else {
        return;
    };
    have_docker_cli();
    let engine = Docker::new(w.dir.join("d"));
    let group = TestGroup::new(&format!("{}-dk", w.prefix));
    let h1 = w.add_host();
    let upstream = format!("unix://{}", engine.socket().display());
    let args = [
        "--ipalloc-range",
        "198.19.0.0/16",
        "--docker-host",
        &upstream,
    ];
    let proxy = h1.run_dir.join("docker.sock");

    let missing = format!("{}-none", w.prefix);
    let out = w.try_launch(&h1, &[&args[..], &["--proxy-group", &missing]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.trim().lines().count() == 1
            && err.contains("--proxy-group")
            && err.contains("no such group"),
        "launch with a missing group: {}",
        show(&out)
    );
    assert!(
        !h1.daemon_running(),
        "a daemon runs after the failed launch"
    );
    assert!(!proxy.exists(), "docker.sock left by the failed launch");

    w.launch(&h1, &[&args[..], &["--proxy-group", &group.name]].concat());
    let meta = std::fs::metadata(&proxy).expect("the proxy's socket exists");
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o777),
        (0, group.gid, 0o660),
        "docker.sock's owner, group and mode with --proxy-group"
    );

    // The way to the socket must be open to others for this check (the
    // run dir of a real host, /run/mesh, is).
    let mut dir = proxy.parent();
    while let Some(d) = dir {
        if d.starts_with(&w.dir) {
            let mode = std::fs::metadata(d).expect("dir").permissions().mode();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o005))
                .expect("chmod");
        }
        dir = d.parent();
    }
    engine.ok(&[
        "create",
        "--network",
        "none",
        "--name",
        "seen",
        IMAGE,
        "true",
    ]);
    let config = w.dir.join("nobody-config");
    let out = docker_ps_as_nobody(&proxy, &config, &[group.gid]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "seen",
        "docker ps as a member of {}: {}",
        group.name,
        show(&out)
    );
    let out = docker_ps_as_nobody(&proxy, &config, &[]);
    assert!(
        !out.status.success() && show(&out).contains("permission denied"),
        "docker ps as nobody, in no group: {}",
        show(&out)
    );
}
