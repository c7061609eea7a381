//! clap's parse errors, made short but complete: what is wrong on the first
//! line (the argument that is missing, the word not understood and clap's
//! suggestion for it, the values allowed), and for usage errors the usage
//! line of the command on a second. A bad value of a known option is one
//! line: the option is named in it.
//!
//! The text is built from the error's context (`clap::error::ContextKind`),
//! not by cutting up clap's rendering; a kind of error without the context
//! expected falls back to clap's own first line.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// What `mesh` prints on stderr for a parse error of `cmd`'s grammar
/// (without a trailing newline), one or two lines.
pub(super) fn render(e: &clap::Error, cmd: &clap::Command) -> String {
    let first = first_line(e);
    if !is_usage_error(e.kind()) {
        return format!("mesh: {first}");
    }
    match usage(e) {
        Some(u) => {
            let help = help_command(&u);
            let u = general_usage(cmd, &help).unwrap_or(u);
            format!("mesh: {first}\nUsage: {u} (more: `{help} --help`)")
        }
        None => format!("mesh: {first} (see `mesh --help`)"),
    }
}

/// The usage of command `path` (`mesh launch`) as its help shows it: clap's
/// error usage lists the arguments given instead of `[OPTIONS]`.
fn general_usage(cmd: &clap::Command, path: &str) -> Option<String> {
    let mut cmd = cmd.clone();
    cmd.build();
    let mut sub = &cmd;
    for word in path.split_whitespace().skip(1) {
        sub = sub.find_subcommand(word)?;
    }
    let u = sub.clone().render_usage().to_string();
    let u = u.trim().strip_prefix("Usage:").unwrap_or(&u).trim();
    Some(u.lines().next()?.trim().to_string()).filter(|s| !s.is_empty())
}

/// Errors about the shape of the command line (as opposed to one value),
/// which get the usage line.
fn is_usage_error(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8
    )
}

/// A context value as plain text: strings joined with ", ".
fn text(v: &ContextValue) -> Option<String> {
    match v {
        ContextValue::String(s) => Some(s.clone()),
        ContextValue::Strings(v) if !v.is_empty() => Some(v.join(", ")),
        ContextValue::StyledStr(s) => Some(s.to_string()),
        ContextValue::StyledStrs(v) if !v.is_empty() => Some(
            v.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ContextValue::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn get(e: &clap::Error, kind: ContextKind) -> Option<String> {
    e.get(kind).and_then(text)
}

/// Each quoted, joined with " or ".
fn quoted(v: &ContextValue) -> Option<String> {
    let list: Vec<String> = match v {
        ContextValue::String(s) => vec![s.clone()],
        ContextValue::Strings(v) => v.clone(),
        ContextValue::StyledStr(s) => vec![s.to_string()],
        ContextValue::StyledStrs(v) => v.iter().map(|s| s.to_string()).collect(),
        _ => return None,
    };
    let list: Vec<String> = list.iter().map(|s| format!("'{s}'")).collect();
    (!list.is_empty()).then(|| list.join(" or "))
}

/// clap's suggestion of any kind, as "did you mean ...?".
fn suggestion(e: &clap::Error) -> Option<String> {
    [
        ContextKind::SuggestedSubcommand,
        ContextKind::SuggestedArg,
        ContextKind::SuggestedValue,
    ]
    .into_iter()
    .find_map(|k| e.get(k).and_then(quoted))
    .map(|s| format!("did you mean {s}?"))
}

/// The first line: what is wrong, with the suggestion or the values
/// allowed when clap has them.
fn first_line(e: &clap::Error) -> String {
    let mut line = match e.kind() {
        ErrorKind::InvalidSubcommand => match get(e, ContextKind::InvalidSubcommand) {
            Some(s) => format!("unknown command '{s}'"),
            None => clap_first_line(e),
        },
        ErrorKind::UnknownArgument => match get(e, ContextKind::InvalidArg) {
            Some(a) => format!("unexpected argument '{a}'"),
            None => clap_first_line(e),
        },
        ErrorKind::MissingRequiredArgument => match get(e, ContextKind::InvalidArg) {
            Some(a) => format!("missing required argument {a}"),
            None => clap_first_line(e),
        },
        ErrorKind::InvalidValue => {
            match (
                get(e, ContextKind::InvalidValue),
                get(e, ContextKind::InvalidArg),
            ) {
                (Some(v), Some(a)) if v.is_empty() => format!("{a} needs a value"),
                (Some(v), Some(a)) => format!("invalid value '{v}' for {a}"),
                _ => clap_first_line(e),
            }
        }
        _ => clap_first_line(e),
    };
    if let Some(s) = suggestion(e) {
        line.push_str("; ");
        line.push_str(&s);
    }
    if e.kind() == ErrorKind::InvalidValue {
        if let Some(values) = get(e, ContextKind::ValidValue) {
            line.push_str(&format!(" (one of: {values})"));
        }
    }
    line
}

/// clap's own first line, without its "error: " prefix.
fn clap_first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    first
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_string()
}

/// The usage line of the command the error is about, without "Usage: ".
fn usage(e: &clap::Error) -> Option<String> {
    let u = get(e, ContextKind::Usage)?;
    let u = u.trim();
    let u = u.strip_prefix("Usage:").unwrap_or(u).trim();
    // A command with several usages: the first is enough.
    Some(u.lines().next()?.trim().to_string()).filter(|s| !s.is_empty())
}

/// `mesh SUBCOMMAND` from a usage line: its words up to the first
/// argument or option.
fn help_command(usage: &str) -> String {
    usage
        .split_whitespace()
        .take_while(|w| !w.starts_with(['<', '[', '-']))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(args: &[&str]) -> String {
        let mut all = vec!["mesh"];
        all.extend_from_slice(args);
        let cmd = super::super::help::command();
        match cmd.clone().try_get_matches_from(all) {
            Ok(_) => panic!("{args:?} parsed"),
            Err(e) => render(&e, &cmd),
        }
    }

    #[test]
    fn a_typo_gets_a_suggestion_and_the_usage() {
        let e = err(&["stauts"]);
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines.len(), 2, "{e}");
        assert_eq!(
            lines[0],
            "mesh: unknown command 'stauts'; did you mean 'status'?"
        );
        assert!(lines[1].starts_with("Usage: mesh "), "{e}");
        assert!(lines[1].ends_with("(more: `mesh --help`)"), "{e}");
    }

    #[test]
    fn a_missing_argument_is_named() {
        let e = err(&["connect"]);
        assert_eq!(
            e,
            "mesh: missing required argument <PEER[:PORT]>...\n\
             Usage: mesh connect <PEER[:PORT]>... (more: `mesh connect --help`)"
        );
        let e = err(&["rmpeer"]);
        assert!(
            e.starts_with("mesh: missing required argument <NAME>\n"),
            "{e}"
        );
        let e = err(&["completion"]);
        assert!(
            e.starts_with("mesh: missing required argument <SHELL>\n"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_option_gets_a_suggestion() {
        let e = err(&["launch", "--ipalloc-rang", "198.19.0.0/16"]);
        assert!(
            e.starts_with("mesh: unexpected argument '--ipalloc-rang'; did you mean '--ipalloc-range'?\nUsage: mesh launch [OPTIONS] "),
            "{e}"
        );
        assert!(e.ends_with("(more: `mesh launch --help`)"), "{e}");
    }

    #[test]
    fn a_bad_value_is_one_line() {
        let e = err(&["status", "peer"]);
        assert_eq!(
            e,
            "mesh: invalid value 'peer' for [WHAT]; did you mean 'peers'? \
             (one of: peers, connections, targets, ipam, dns)"
        );
        let e = err(&["completion", "powershell"]);
        assert_eq!(
            e,
            "mesh: invalid value 'powershell' for <SHELL> (one of: bash, zsh, fish)"
        );
        let e = err(&["launch", "--ipalloc-range", "198.19.8.1/24"]);
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("--ipalloc-range") && e.contains("host bits"),
            "{e}"
        );
    }

    #[test]
    fn help_command_stops_at_the_arguments() {
        assert_eq!(
            help_command("mesh connect <PEER[:PORT]>..."),
            "mesh connect"
        );
        assert_eq!(help_command("mesh [OPTIONS] <COMMAND>"), "mesh");
    }
}
