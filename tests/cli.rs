//! The command line as a user meets it: parse errors that name the missing
//! argument and suggest the right word, with the command's usage; the
//! version; completion scripts that bash loads and that complete commands;
//! the manual page; one clear line, naming the fix, for each common
//! mistake (no root, no daemon, unknown peer or target, a CIDR outside the
//! range, a range over a host route); progress shown on a terminal and
//! nothing of it when the output is piped.
//!
//! The first tests need neither root nor a daemon; the others run real
//! daemons in namespace hosts through the harness (`tests/common`).

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// Deadline of the commands that need no daemon.
const QUICK: Duration = Duration::from_secs(20);

/// `mesh ARGS...` outside any namespace, with no mesh environment.
fn mesh(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(MESH);
    cmd.args(args);
    for var in ["MESH_RUN_DIR", "MESH_DATA_DIR", "CNI_COMMAND"] {
        cmd.env_remove(var);
    }
    run(&mut cmd, QUICK)
}

/// A usage error: exit 2, stderr two lines (what is wrong, then the
/// usage), no panic; returns them.
#[track_caller]
fn usage_error(args: &[&str]) -> (String, String) {
    let out = mesh(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "`mesh {}`: {}",
        args.join(" "),
        show(&out)
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "`mesh {}`: {stderr:?}", args.join(" "));
    assert!(
        out.stdout.is_empty(),
        "usage error on stdout: {}",
        show(&out)
    );
    (lines[0].to_string(), lines[1].to_string())
}

#[test]
fn usage_errors_name_the_argument_and_suggest() {
    let (what, usage) = usage_error(&["connect"]);
    assert!(
        what.contains("<PEER[:PORT]>"),
        "missing argument not named: {what}"
    );
    assert!(usage.starts_with("Usage: mesh connect "), "{usage}");

    let (what, usage) = usage_error(&["stauts"]);
    assert!(what.contains("did you mean 'status'?"), "{what}");
    assert!(usage.starts_with("Usage: mesh "), "{usage}");

    let (what, usage) = usage_error(&["launch", "--ipalloc-rang", "198.19.0.0/16"]);
    assert!(what.contains("did you mean '--ipalloc-range'?"), "{what}");
    assert!(usage.starts_with("Usage: mesh launch [OPTIONS]"), "{usage}");

    let (what, _) = usage_error(&["rmpeer"]);
    assert!(what.contains("<NAME>"), "{what}");

    // A bad value of a known argument: one line, the value and the
    // argument named, clap's suggestion and the choices.
    let out = mesh(&["status", "peer"]);
    let line = assert_one_line_error(&out, "`mesh status peer`");
    assert!(line.contains("did you mean 'peers'?"), "{line}");
    assert!(line.contains("connections"), "{line}");
    let out = mesh(&["launch", "--ipalloc-range", "198.19.8.1/24"]);
    let line = assert_one_line_error(&out, "`mesh launch --ipalloc-range 198.19.8.1/24`");
    assert!(
        line.contains("--ipalloc-range") && line.contains("host bits"),
        "{line}"
    );
}

#[test]
fn version_flag_and_command() {
    let want = format!("mesh {}", env!("CARGO_PKG_VERSION"));
    for flag in ["--version", "-V"] {
        let out = mesh(&[flag]);
        assert!(out.status.success(), "{}", show(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want);
    }
    let out = mesh(&["version"]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.first(), Some(&want.as_str()), "{text}");
    assert!(
        lines.get(1).is_some_and(|l| l.starts_with("protocol ")),
        "{text}"
    );
}

/// What bash's completion function offers for the words `line` (the last
/// one being completed).
fn bash_completes(line: &str) -> Vec<String> {
    let script = format!(
        r#"source <("{MESH}" completion bash) || exit 3
complete -p mesh >/dev/null || exit 4
COMP_LINE='{line}'
read -ra COMP_WORDS <<< "$COMP_LINE"
case "$COMP_LINE" in *' ') COMP_WORDS+=('');; esac
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_POINT=${{#COMP_LINE}}
_mesh mesh "${{COMP_WORDS[$COMP_CWORD]}}" "${{COMP_WORDS[$COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#
    );
    let out = run(Command::new("bash").args(["--norc", "-c", &script]), QUICK);
    assert!(out.status.success(), "bash completion: {}", show(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn bash_loads_the_completion_script_and_completes_commands() {
    let out = run(
        Command::new("bash").args([
            "--norc",
            "-c",
            &format!("source <(\"{MESH}\" completion bash) && complete -p mesh"),
        ]),
        QUICK,
    );
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("-F _mesh") && text.trim_end().ends_with(" mesh"),
        "{text}"
    );

    assert_eq!(bash_completes("mesh la"), ["launch"]);
    assert_eq!(bash_completes("mesh att"), ["attach"]);
    let all = bash_completes("mesh ");
    for c in ["launch", "attach", "status", "dns-lookup", "completion"] {
        assert!(all.iter().any(|w| w == c), "no {c} in {all:?}");
    }
    assert!(
        !all.iter().any(|w| w == "man"),
        "the hidden man completes: {all:?}"
    );
    let opts = bash_completes("mesh launch --ipalloc-r");
    assert!(opts.iter().any(|w| w == "--ipalloc-range"), "{opts:?}");
    let parts = bash_completes("mesh status ");
    assert!(parts.iter().any(|w| w == "peers"), "{parts:?}");

    // zsh and fish: the scripts are printed (those shells are not installed
    // on CI to load them).
    for shell in ["zsh", "fish"] {
        let out = mesh(&["completion", shell]);
        assert!(out.status.success(), "{}", show(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("launch") && text.contains("attach"),
            "{shell}"
        );
    }
}

#[test]
fn man_page_renders_with_name_synopsis_and_commands() {
    let dir = std::env::temp_dir().join(format!("mesh-cli-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = mesh(&["man", "--dir", &dir.to_string_lossy()]);
    assert!(out.status.success(), "{}", show(&out));
    for page in [
        "mesh.1",
        "mesh-launch.1",
        "mesh-attach.1",
        "mesh-completion.1",
    ] {
        assert!(dir.join(page).is_file(), "no {page} in {}", dir.display());
    }
    // `mesh man` on stdout is the same mesh.1.
    let out = mesh(&["man"]);
    assert!(out.status.success(), "{}", show(&out));
    let page = std::fs::read(dir.join("mesh.1")).expect("mesh.1");
    assert!(out.stdout == page, "`mesh man` differs from mesh.1");

    let rendered = run(
        Command::new("man")
            .args(["-l", &dir.join("mesh.1").to_string_lossy()])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
        QUICK,
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(rendered.status.success(), "{}", show(&rendered));
    let text = String::from_utf8_lossy(&rendered.stdout);
    for word in [
        "NAME",
        "SYNOPSIS",
        "SUBCOMMANDS",
        "mesh-launch(1)",
        "mesh-attach(1)",
    ] {
        assert!(text.contains(word), "man page lacks {word}:\n{text}");
    }
    assert!(
        text.contains("mesh - a container network"),
        "NAME line: {text}"
    );
}

/// Without a daemon: it says which socket it tried and how to start one;
/// without root: to use sudo; a range over the host's route: the route and
/// its interface, and no daemon is left running.
#[test]
fn mistakes_without_a_daemon_name_the_fix() {
    let Some(mut w) = World::new("cli_mistakes_no_daemon") else {
        return;
    };
    let h1 = w.add_host();

    let line = assert_one_line_error(&h1.mesh(&["status"]), "`mesh status` with no daemon");
    let socket = h1.run_dir.to_string_lossy().into_owned();
    assert!(
        line.contains(&socket) && line.contains("mesh launch"),
        "should name the socket under {socket} and `mesh launch`: {line}"
    );

    let copy = world_readable_mesh(&w.dir);
    let out = run(
        &mut h1.command(
            "setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &copy.to_string_lossy(),
                "status",
            ],
        ),
        QUICK,
    );
    let line = assert_one_line_error(&out, "`mesh status` as uid 65534");
    assert!(line.contains("root") && line.contains("sudo"), "{line}");

    // eth0 of h1 has 198.18.0.1/24: its route is inside this range.
    let out = w.try_launch(&h1, &["--ipalloc-range", "198.18.0.0/16"]);
    let line = assert_one_line_error(&out, "launch over the host's route");
    assert!(
        line.contains("198.18.0.0/24") && line.contains(&h1.underlay_if),
        "should name the route 198.18.0.0/24 and {}: {line}",
        h1.underlay_if
    );
    assert!(line.contains("--ipalloc-range"), "{line}");
    assert!(
        !h1.daemon_running(),
        "a daemon started over the host's route"
    );
}

/// With a daemon: an unknown peer or target, a subnet outside the range,
/// each one line that says what to do; a successful launch and attach
/// write nothing on a piped stderr.
#[test]
fn mistakes_with_a_daemon_name_the_fix() {
    let Some(mut w) = World::new("cli_mistakes_daemon") else {
        return;
    };
    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    let out = w.try_launch(&h1, &["--ipalloc-range", "198.19.20.0/24"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        out.stderr.is_empty(),
        "launch wrote on a pipe: {}",
        show(&out)
    );

    let out = h1.mesh(&["rmpeer", "nosuchpeer"]);
    let line = assert_one_line_error(&out, "`mesh rmpeer` of an unknown peer");
    assert!(
        line.contains("nosuchpeer") && line.contains("mesh status peers"),
        "{line}"
    );

    let out = h1.mesh(&["forget", "198.18.0.9"]);
    let line = assert_one_line_error(&out, "`mesh forget` of a non-target");
    assert!(
        line.contains("198.18.0.9") && line.contains("mesh status targets"),
        "{line}"
    );

    for args in [
        vec!["attach", "net:198.19.99.0/24", c1.path.as_str()],
        vec!["expose", "net:198.19.99.0/24"],
    ] {
        let out = h1.mesh(&args);
        let line = assert_one_line_error(&out, &format!("`mesh {}`", args.join(" ")));
        assert!(
            line.contains("198.19.20.0/24") && line.contains("--ipalloc-range"),
            "should name the range and --ipalloc-range: {line}"
        );
    }

    let out = h1.mesh(&["attach", "net:default", "--name", "c1", &c1.path]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        out.stderr.is_empty(),
        "attach wrote on a pipe: {}",
        show(&out)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(printed.lines().count(), 1, "{printed}");
    assert!(printed.starts_with("198.19.20."), "{printed}");

    let out = h1.mesh(&["stop"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        out.stderr.is_empty(),
        "stop wrote on a pipe: {}",
        show(&out)
    );
}

/// An attach that waits (a ring that needs two peers' consensus, one peer
/// alone): on a terminal (`script`) it shows what it waits for; piped, its
/// stderr is the one line of the final error.
#[test]
fn progress_on_a_terminal_only() {
    let Some(mut w) = World::new("cli_progress") else {
        return;
    };
    let h1 = w.add_host();
    let c1 = w.add_container("c1");
    w.launch(
        &h1,
        &[
            "--ipalloc-range",
            "198.19.21.0/24",
            "--ipalloc-init",
            "consensus=2",
            "--ipalloc-timeout",
            "3s",
        ],
    );

    let out = h1.mesh(&["attach", "net:default", &c1.path]);
    let line = assert_one_line_error(&out, "attach without consensus, piped");
    assert!(!line.contains("waiting for an address"), "{line}");

    let cmdline = format!("{MESH} attach net:default {}", c1.path);
    let out = run(
        &mut h1.command("script", &["-qec", &cmdline, "/dev/null"]),
        CMD_TIMEOUT,
    );
    let tty = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "attach succeeded alone: {tty}");
    assert!(
        tty.contains("waiting for an address"),
        "no progress on the terminal: {tty:?}"
    );
    // The line is erased before the error is printed.
    assert!(tty.contains("\r\x1b[K"), "progress not erased: {tty:?}");
    assert!(
        tty.contains("mesh: "),
        "no error after the progress: {tty:?}"
    );
    assert!(c1.ethmesh_mac().is_none(), "a failed attach left ethmesh");
}
