//! The Debian package: `scripts/deb.sh` (cargo-deb) packages the binary the
//! tests built (`--profile release --no-build --fast`: the `dist` profile's
//! fat-LTO build takes minutes, see README "Install"), and the package is
//! checked as a fresh host would meet it:
//!
//! - its control fields (name, version, `Depends` naming `nftables` and
//!   `iproute2`) and its conffile `/etc/default/mesh`;
//! - its files: the binary, the systemd unit (the same as
//!   `contrib/mesh.service`), the README, and, when the binary prints
//!   them (`mesh man`, `mesh completion`), the man page and completions;
//! - unpacked (`dpkg-deb -x`) into an empty root, its `usr/bin/mesh` runs in
//!   a namespace host: `launch`, `status`, an attach, `stop`.
//!
//! A full `dpkg -i` into a debootstrapped Debian is `scripts/deb-chroot.sh`,
//! on demand (it downloads a base system).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// How long packaging may take (cargo metadata, strip, compression).
const PACKAGE_TIMEOUT: Duration = Duration::from_secs(600);

/// `program args...` with a deadline, which must exit 0; its stdout.
#[track_caller]
fn ok(cmd: &mut Command, what: &str) -> String {
    let out = run(cmd, PACKAGE_TIMEOUT);
    assert!(out.status.success(), "{what}: {}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether the binary under test has subcommand `args` (it exits 0).
fn binary_has(args: &[&str]) -> bool {
    try_run(Command::new(MESH).args(args), CMD_TIMEOUT).is_ok_and(|o| o.status.success())
}

/// The one `.deb` in `dir`.
#[track_caller]
fn the_deb(dir: &Path) -> std::path::PathBuf {
    let debs: Vec<_> = std::fs::read_dir(dir)
        .expect("read the output dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(
        debs.len(),
        1,
        "expected one .deb in {}: {debs:?}",
        dir.display()
    );
    debs[0].clone()
}

#[test]
fn deb_package_installs_and_runs() {
    let Some(mut w) = World::new("deb_package_installs_and_runs") else {
        return;
    };
    let has_cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        has_cargo_deb,
        "cargo-deb is missing: cargo install cargo-deb --locked (scripts/test.sh installs it)"
    );
    let out_dir = w.dir.join("deb");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/deb.sh");
    let out_s = out_dir.to_string_lossy().into_owned();
    ok(
        Command::new(script).args(["--profile", "release", "--no-build", "--fast", "-o", &out_s]),
        "scripts/deb.sh",
    );
    let deb = the_deb(&out_dir);
    let deb_s = deb.to_string_lossy().into_owned();

    // Control fields and conffiles.
    let field = |name: &str| {
        ok(
            Command::new("dpkg-deb").args(["-f", &deb_s, name]),
            "dpkg-deb -f",
        )
        .trim()
        .to_string()
    };
    assert_eq!(field("Package"), "mesh");
    assert_eq!(field("Version"), format!("{}-1", env!("CARGO_PKG_VERSION")));
    let depends = field("Depends");
    for dep in ["nftables", "iproute2", "libc6"] {
        assert!(
            depends.split(',').any(|d| d.trim().starts_with(dep)),
            "Depends lacks {dep}: {depends}"
        );
    }
    let conffiles = ok(
        Command::new("dpkg-deb").args(["-I", &deb_s, "conffiles"]),
        "dpkg-deb -I conffiles",
    );
    assert!(
        conffiles.lines().any(|l| l.trim() == "/etc/default/mesh"),
        "/etc/default/mesh is not a conffile: {conffiles:?}"
    );

    // Contents.
    let listing = ok(Command::new("dpkg-deb").args(["-c", &deb_s]), "dpkg-deb -c");
    let files: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    let mut want = vec![
        "./usr/bin/mesh",
        "./usr/lib/systemd/system/mesh.service",
        "./etc/default/mesh",
        "./usr/share/doc/mesh/README.md",
        "./usr/share/doc/mesh/copyright",
    ];
    if binary_has(&["completion", "bash"]) {
        want.extend([
            "./usr/share/bash-completion/completions/mesh",
            "./usr/share/zsh/vendor-completions/_mesh",
            "./usr/share/fish/vendor_completions.d/mesh.fish",
        ]);
    } else {
        eprintln!("(this binary has no `mesh completion`: no completion scripts expected)");
    }
    if binary_has(&["man", "--help"]) {
        want.push("./usr/share/man/man1/mesh.1.gz");
    } else {
        eprintln!("(this binary has no `mesh man`: no man page expected)");
    }
    for f in want {
        assert!(files.contains(&f), "the package lacks {f}:\n{listing}");
    }

    // Unpacked into an empty root, as on a fresh host.
    let root = w.dir.join("root");
    ok(
        Command::new("dpkg-deb").args(["-x", &deb_s, &root.to_string_lossy()]),
        "dpkg-deb -x",
    );
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/mesh.service"))
        .expect("the installed unit");
    let contrib =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/mesh.service"))
            .expect("contrib/mesh.service");
    assert_eq!(
        unit, contrib,
        "the packaged unit differs from contrib/mesh.service"
    );
    let installed = root.join("usr/bin/mesh");
    let installed_s = installed.to_string_lossy().into_owned();
    let version = ok(
        Command::new(&installed).arg("version"),
        "installed mesh version",
    );
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")),
        "installed `mesh version` says {version:?}"
    );

    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    let out = run(
        &mut h1.command(&installed_s, &["launch", "--nickname", "deb"]),
        LAUNCH_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "installed mesh launch: {}",
        show(&out)
    );
    let pid = h1
        .daemon_pid()
        .expect("mesh.pid after the installed launch");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).ok(),
        Some(installed.clone()),
        "the daemon is not the installed binary"
    );
    let status = ok(
        &mut h1.command(&installed_s, &["status"]),
        "installed mesh status",
    );
    assert!(
        status.contains("deb"),
        "status lacks the nickname:\n{status}"
    );
    let attached = ok(
        &mut h1.command(
            &installed_s,
            &["attach", "ip:198.19.1.1/24", "--name", "c1", &c1.path],
        ),
        "installed mesh attach",
    );
    assert!(
        attached.lines().any(|l| l.trim() == "198.19.1.1/24"),
        "attach printed {attached:?}"
    );
    ok(
        &mut h1.command(&installed_s, &["stop"]),
        "installed mesh stop",
    );
    wait_until(Duration::from_secs(15), "the daemon exits", || {
        !pid_alive(pid)
    });
}
