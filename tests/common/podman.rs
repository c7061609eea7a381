//! A private podman for the integration tests (shared/containers.md): its
//! own store, run root and configuration (runc, ulimits the sandbox
//! allows), a busybox image imported without a registry, optionally the
//! CNI backend with `mesh` as a plugin and the Docker-compatible API
//! served from the root network namespace. When dropped: every container
//! removed, the API service and the `conmon`s of `exec`s stopped, every
//! mount under its directory undone.

use super::consts::*;
use super::process::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A private podman under one directory.
pub struct Podman {
    /// Its directory (store, run root, configuration).
    pub dir: PathBuf,
    service: Option<Child>,
}

impl Podman {
    /// Set up under `dir` with the image `localhost/bbox`; with
    /// `cni_plugin` (one plugin entry of a conflist, JSON), the network
    /// `mesh` uses the CNI backend with that plugin.
    pub fn new(dir: PathBuf, cni_plugin: Option<&str>) -> Podman {
        let have = Command::new("podman").arg("--version").output();
        assert!(
            have.is_ok_and(|o| o.status.success()),
            "podman is not installed (scripts/test.sh installs it)"
        );
        let p = Podman { dir, service: None };
        std::fs::create_dir_all(&p.dir).expect("mkdir");
        let mut conf = String::from(
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n\
             [engine]\nruntime = \"runc\"\n",
        );
        if let Some(plugin) = cni_plugin {
            let (plugins, netconf) = (p.dir.join("plugins"), p.dir.join("netconf"));
            for d in [&plugins, &netconf] {
                std::fs::create_dir_all(d).expect("mkdir");
            }
            std::os::unix::fs::symlink(MESH, plugins.join("mesh")).expect("link the plugin");
            std::fs::write(
                netconf.join("mesh.conflist"),
                format!(r#"{{"cniVersion":"1.0.0","name":"mesh","plugins":[{plugin}]}}"#),
            )
            .expect("write conflist");
            conf.push_str(&format!(
                "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n\
                 network_config_dir = \"{}\"\n",
                plugins.display(),
                netconf.display()
            ));
        }
        std::fs::write(p.dir.join("containers.conf"), conf).expect("write containers.conf");
        let tar = busybox_tar(&p.dir).display().to_string();
        p.ok(&[
            "import",
            "--change",
            "ENV PATH=/bin",
            &tar,
            "localhost/bbox",
        ]);
        p
    }

    /// Serve the Docker-compatible API on [`Self::socket`], from the root
    /// network namespace (never under `ip netns exec`).
    pub fn serve_api(&mut self) {
        let sock = self.socket();
        let child = self
            .cmd(&[
                "system",
                "service",
                "--time=0",
                &format!("unix://{}", sock.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start podman system service");
        self.service = Some(child);
        wait_until(
            Duration::from_secs(30),
            "podman's API socket appears",
            || sock.exists(),
        );
    }

    /// Where [`Self::serve_api`] serves.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("podman.sock")
    }

    /// `podman ARGS...` with this store and configuration.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .args(["--root", &self.dir.join("store").display().to_string()])
            .args(["--runroot", &self.dir.join("run").display().to_string()])
            .args(args);
        c
    }

    /// `podman ARGS...`, which must succeed; its stdout, trimmed.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = run(&mut self.cmd(args), Duration::from_secs(120));
        assert!(out.status.success(), "podman {args:?}: {}", show(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `conmon` processes of this podman (they outlive `exec`s).
    fn conmons(&self) -> Vec<i32> {
        let dir = self.dir.display().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let args: Vec<String> = cmdline
                    .split(|&b| b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                args.first().is_some_and(|a| a.ends_with("conmon"))
                    && args.iter().any(|a| a.contains(&dir))
            })
            .collect()
    }
}

/// A tar of a busybox root file system (busybox and a link for each
/// applet) under `dir`, for `import`: no registry is reachable.
pub fn busybox_tar(dir: &std::path::Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).expect("mkdir rootfs");
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy busybox");
    let list = run_ok("/bin/busybox", &["--list"]);
    for applet in list.split_whitespace().filter(|a| *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
    }
    let tar = dir.join("rootfs.tar");
    run_ok(
        "tar",
        &[
            "-C",
            &rootfs.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ],
    );
    tar
}

/// Unmount (lazily, deepest first) whatever is mounted under `dir`.
pub fn unmount_under(dir: &std::path::Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.display().to_string();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| m.starts_with(&dir))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = try_run(
            Command::new("umount").args(["-l", m]),
            Duration::from_secs(10),
        );
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = try_run(
            &mut self.cmd(&["rm", "--all", "--force", "--time", "0"]),
            Duration::from_secs(60),
        );
        if let Some(mut child) = self.service.take() {
            let _ = child.kill();
            let _ = wait_child(&mut child, Duration::from_secs(10));
        }
        for pid in self.conmons() {
            terminate(pid);
        }
        // What podman leaves mounted under its store (overlay, shm).
        unmount_under(&self.dir);
    }
}
