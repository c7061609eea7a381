//! A private Docker engine for the integration tests (shared/containers.md):
//! Debian's `dockerd` with its own data root, exec root, pid file and API
//! socket, no bridge, no iptables, no masquerade (it touches none of the
//! machine's networking), and the image `meshtest/bbox` imported from a
//! busybox root file system (no registry is reachable). Like podman, it
//! runs in the root network namespace. When dropped: every container and
//! network removed, the daemon stopped by its PID, every mount under its
//! directory undone.

use super::podman::{busybox_tar, unmount_under};
use super::process::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The image every Docker test runs.
pub const IMAGE: &str = "meshtest/bbox";

/// How long a `docker` command may take.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

/// A private `dockerd` under one directory.
pub struct Docker {
    /// Its directory (data root, exec root, socket, log).
    pub dir: PathBuf,
    daemon: Option<Child>,
}

impl Docker {
    /// Start a private `dockerd` under `dir` (keep it short: containerd's
    /// sockets live under the exec root) and import [`IMAGE`].
    pub fn new(dir: PathBuf) -> Docker {
        Docker::start(dir, None)
    }

    /// The same, in the network namespace `netns` (a test host's: the mesh
    /// daemon and dockerd share the host's namespace, as on a real host;
    /// the network plugin's veths are made there). `nsenter`, not `ip
    /// netns exec`, which would remount `/sys` and lose the cgroups.
    pub fn in_netns(dir: PathBuf, netns: &str) -> Docker {
        Docker::start(dir, Some(netns))
    }

    fn start(dir: PathBuf, netns: Option<&str>) -> Docker {
        let have = Command::new("dockerd").arg("--version").output();
        assert!(
            have.is_ok_and(|o| o.status.success()),
            "dockerd is not installed (scripts/test.sh installs docker.io)"
        );
        std::fs::create_dir_all(&dir).expect("mkdir docker dir");
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("create dockerd.log");
        let err = log.try_clone().expect("clone log");
        let d = |p: &str| dir.join(p).display().to_string();
        // Sandboxes are bind mounts under the exec root, made after the mesh
        // daemons started in mount namespaces of their own (`ip netns
        // exec`): a shared mount carries them there.
        std::fs::create_dir_all(dir.join("exec")).expect("mkdir exec root");
        run_ok("mount", &["--bind", &d("exec"), &d("exec")]);
        run_ok("mount", &["--make-shared", &d("exec")]);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg("dockerd");
                c
            }
            None => Command::new("dockerd"),
        };
        let child = cmd
            .args(["--data-root", &d("root"), "--exec-root", &d("exec")])
            .args(["--pidfile", &d("dockerd.pid")])
            .args(["-H", &format!("unix://{}", d("docker.sock"))])
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start dockerd");
        let mut docker = Docker {
            dir,
            daemon: Some(child),
        };
        wait_until(Duration::from_secs(60), "dockerd answers", || {
            docker.socket().exists()
                && try_run(&mut docker.cmd(&["version"]), Duration::from_secs(10))
                    .is_ok_and(|o| o.status.success())
        });
        let tar = busybox_tar(&docker.dir).display().to_string();
        docker.ok(&["import", "--change", "ENV PATH=/bin", &tar, IMAGE]);
        docker.daemon.as_mut().map(|_| ()).expect("dockerd child");
        docker
    }

    /// The engine's own API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `docker ARGS...` against the engine's own socket.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.via(&self.socket(), args)
    }

    /// `docker ARGS...` against `sock` (the engine's, or a proxy in front of
    /// it), with a private client configuration.
    pub fn via(&self, sock: &Path, args: &[&str]) -> Command {
        let mut c = Command::new("docker");
        c.env("DOCKER_HOST", format!("unix://{}", sock.display()))
            .env("DOCKER_CONFIG", self.dir.join("client"))
            .args(args);
        c
    }

    /// `docker ARGS...` on the engine's socket, which must succeed; its
    /// stdout, trimmed.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_via(&self.socket(), args)
    }

    /// `docker ARGS...` on `sock`, which must succeed; its stdout, trimmed.
    #[track_caller]
    pub fn ok_via(&self, sock: &Path, args: &[&str]) -> String {
        let out = self.run_via(sock, args);
        assert!(out.status.success(), "docker {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `docker ARGS...` on `sock`, whatever its outcome.
    pub fn run_via(&self, sock: &Path, args: &[&str]) -> Output {
        run(&mut self.via(sock, args), DOCKER_TIMEOUT)
    }

    /// The engine's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        // Nothing in here may panic: a panic while unwinding aborts the run.
        if std::thread::panicking() {
            eprintln!(
                "----- dockerd.log (last 40 lines) -----\n{}",
                self.log_tail(40)
            );
        }
        if let Ok(out) = try_run(&mut self.cmd(&["ps", "-aq"]), Duration::from_secs(30)) {
            let ids = String::from_utf8_lossy(&out.stdout).to_string();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let mut args = vec!["rm", "-f"];
                args.extend(ids);
                let _ = try_run(&mut self.cmd(&args), Duration::from_secs(60));
            }
        }
        let _ = try_run(
            &mut self.cmd(&["network", "prune", "-f"]),
            Duration::from_secs(30),
        );
        if let Some(mut child) = self.daemon.take() {
            terminate(child.id() as i32);
            if wait_child(&mut child, Duration::from_secs(20)).is_none() {
                let _ = child.kill();
                let _ = wait_child(&mut child, Duration::from_secs(10));
            }
        }
        unmount_under(&self.dir);
    }
}
