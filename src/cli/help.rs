//! Help grouped by task, and the artefacts generated from the grammar: the
//! shell completion scripts (`clap_complete`) and the manual page
//! (`clap_mangen`).
//!
//! clap lists subcommands under one heading, so `mesh --help` gets a
//! template whose command list is drawn here from [`GROUPS`]; `launch`'s
//! options get a heading each from [`LAUNCH_HEADINGS`]. Both tables name
//! every visible command and option: a unit test fails when one is added
//! without a place in them. [`command`] is the one decorated
//! `clap::Command` that parsing, completions and the man page all use.

use super::args::{Cli, CompletionShell};
use clap::CommandFactory;
use std::io::Write;

/// The commands of `mesh --help`, by task, in the order shown.
pub(super) const GROUPS: &[(&str, &[&str])] = &[
    (
        "Mesh",
        &["launch", "stop", "reset", "connect", "forget", "rmpeer"],
    ),
    ("Containers", &["attach", "detach", "run", "ps"]),
    ("Addresses", &["expose", "hide", "prime"]),
    ("Names", &["dns-add", "dns-remove", "dns-lookup"]),
    ("Docker", &["env"]),
    (
        "Diagnostics",
        &["status", "report", "version", "completion", "help"],
    ),
];

/// `launch`'s options by `--long` name and the heading each is listed
/// under. `log-format` and `metrics-addr` are listed before they exist:
/// a name without an option is ignored.
pub(super) const LAUNCH_HEADINGS: &[(&str, &[&str])] = &[
    (
        "Mesh",
        &[
            "foreground",
            "password",
            "nickname",
            "port",
            "mtu",
            "conn-limit",
            "max-peers",
            "no-fastdp",
            "trusted-subnets",
        ],
    ),
    (
        "Addresses",
        &[
            "ipalloc-range",
            "ipalloc-default-subnet",
            "ipalloc-init",
            "ipalloc-reclaim-after",
            "ipalloc-timeout",
        ],
    ),
    (
        "Names",
        &[
            "no-dns",
            "dns-domain",
            "dns-ttl",
            "dns-listen-address",
            "resolv-conf",
        ],
    ),
    (
        "Docker",
        &[
            "docker-host",
            "docker-plugin",
            "no-docker-plugin",
            "proxy-group",
        ],
    ),
    ("Diagnostics", &["log-level", "log-format", "metrics-addr"]),
];

/// The heading of `launch --LONG`, if the table has one.
fn launch_heading(long: &str) -> Option<&'static str> {
    LAUNCH_HEADINGS
        .iter()
        .find(|(_, longs)| longs.contains(&long))
        .map(|(heading, _)| *heading)
}

/// The whole grammar, with help grouped by task, and the hidden `mesh man
/// [--dir DIR]`: mesh(1) (roff) on stdout, or it and one page per command
/// written into DIR. `man` is not part of `Cli` so that the completion
/// scripts (which list hidden commands too) do not offer it.
pub fn command() -> clap::Command {
    grammar().subcommand(
        clap::Command::new("man")
            .hide(true)
            .about("Print the manual page mesh(1), or write every page into DIR")
            .arg(
                clap::Arg::new("dir")
                    .long("dir")
                    .value_name("DIR")
                    .value_parser(clap::value_parser!(std::path::PathBuf))
                    .help("Write mesh.1 and mesh-COMMAND.1 into this directory"),
            ),
    )
}

/// [`Cli`]'s grammar with help grouped by task: what completions and
/// manual pages describe.
fn grammar() -> clap::Command {
    let cmd = Cli::command().mut_subcommand("launch", |launch| {
        launch.mut_args(|a| match a.get_long().and_then(launch_heading) {
            Some(h) => a.help_heading(h),
            None => a,
        })
    });
    let template = top_template(&cmd);
    cmd.help_template(template)
}

/// `mesh --help`: clap's default layout with the commands under [`GROUPS`].
fn top_template(cmd: &clap::Command) -> String {
    let styles = cmd.get_styles();
    let (h, lit) = (styles.get_header(), styles.get_literal());
    let about = |name: &str| -> String {
        if name == "help" {
            return "Print this message or the help of the given subcommand(s)".to_string();
        }
        cmd.find_subcommand(name)
            .and_then(|c| c.get_about())
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    let width = GROUPS
        .iter()
        .flat_map(|(_, names)| names.iter())
        .map(|n| n.len())
        .max()
        .unwrap_or(0);
    let mut t = String::from("{before-help}{about-with-newline}\n{usage-heading} {usage}\n");
    for (heading, names) in GROUPS {
        t.push_str(&format!("\n{h}{heading}:{h:#}\n"));
        for name in *names {
            let pad = " ".repeat(width - name.len());
            t.push_str(&format!("  {lit}{name}{lit:#}{pad}  {}\n", about(name)));
        }
    }
    t.push_str(&format!("\n{h}Options:{h:#}\n{{options}}{{after-help}}"));
    t
}

/// `mesh completion SHELL`: the script on `out`.
pub(super) fn completion(shell: CompletionShell, out: &mut dyn Write) {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut grammar(), "mesh", out);
}

/// The grammar as the manual pages describe it: NAME says "mesh - ...",
/// and no mesh-help(1), which [`clap_mangen::generate_to`] does not write.
fn man_command() -> clap::Command {
    grammar()
        .about("a container network for Linux hosts, in the tradition of Weave Net")
        .disable_help_subcommand(true)
}

/// `mesh man`: the manual page, mesh(1), in roff.
pub(super) fn man_page(out: &mut dyn Write) -> std::io::Result<()> {
    clap_mangen::Man::new(man_command()).render(out)
}

/// `mesh man --dir DIR`: mesh(1) and a page per visible command,
/// mesh-launch(1) and so on, which mesh(1) refers to.
pub(super) fn man_pages(dir: &std::path::Path) -> std::io::Result<()> {
    clap_mangen::generate_to(man_command(), dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help_text(args: &[&str]) -> String {
        match command().try_get_matches_from(args) {
            Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => e.render().to_string(),
            other => panic!("{args:?} did not print help: {other:?}"),
        }
    }

    /// Every visible command is in exactly one group, and every group's
    /// name is a command: a new command needs a place in `mesh --help`.
    #[test]
    fn every_command_has_one_group() {
        let cmd = command();
        let mut grouped: Vec<&str> = GROUPS.iter().flat_map(|(_, n)| n.iter().copied()).collect();
        for c in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
            let n = grouped.iter().filter(|g| **g == c.get_name()).count();
            assert_eq!(n, 1, "command {} is in {n} groups", c.get_name());
        }
        grouped.retain(|g| *g != "help");
        for g in grouped {
            assert!(cmd.find_subcommand(g).is_some(), "group lists unknown {g}");
        }
    }

    /// Every visible `launch` option has a heading.
    #[test]
    fn every_launch_option_has_a_heading() {
        let cmd = command();
        let launch = cmd.find_subcommand("launch").expect("launch");
        for a in launch.get_arguments() {
            let Some(long) = a.get_long() else { continue };
            if a.is_hide_set() || long == "help" {
                continue;
            }
            assert!(
                a.get_help_heading().is_some(),
                "launch --{long} has no heading in LAUNCH_HEADINGS"
            );
        }
    }

    #[test]
    fn top_help_lists_commands_by_task() {
        let help = help_text(&["mesh", "--help"]);
        let pos = |s: &str| help.find(s).unwrap_or_else(|| panic!("no {s:?} in {help}"));
        assert!(pos("Mesh:") < pos("  launch"));
        assert!(pos("  launch") < pos("Containers:"));
        assert!(pos("Containers:") < pos("  attach"));
        assert!(pos("Names:") < pos("  dns-lookup"));
        assert!(pos("Diagnostics:") < pos("  completion"));
        assert!(pos("Diagnostics:") < pos("Options:"));
        assert!(help.contains("-V, --version"), "{help}");
        assert!(
            !help.contains("  man "),
            "the hidden man command shows: {help}"
        );
        assert!(!help.contains('\x1b'), "styling leaked into plain text");
    }

    #[test]
    fn launch_help_has_task_headings() {
        let help = help_text(&["mesh", "launch", "--help"]);
        for h in ["Mesh:", "Addresses:", "Names:", "Docker:", "Diagnostics:"] {
            assert!(help.contains(h), "no {h} in {help}");
        }
        let pos = |s: &str| help.find(s).unwrap_or_else(|| panic!("no {s:?} in {help}"));
        assert!(pos("Addresses:") < pos("--ipalloc-range"));
        assert!(pos("Names:") < pos("--dns-domain"));
    }

    #[test]
    fn completion_scripts_name_the_commands() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let mut out = Vec::new();
            completion(shell, &mut out);
            let text = String::from_utf8(out).expect("utf-8");
            for word in ["launch", "attach", "dns-lookup", "ipalloc-range"] {
                assert!(text.contains(word), "{shell:?} script lacks {word}");
            }
        }
    }

    #[test]
    fn man_page_has_name_synopsis_and_commands() {
        let mut out = Vec::new();
        man_page(&mut out).expect("render");
        let text = String::from_utf8(out).expect("utf-8");
        for word in [
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH SUBCOMMANDS",
            "launch",
            "attach",
        ] {
            assert!(text.contains(word), "man page lacks {word}");
        }
    }
}
