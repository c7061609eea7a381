//! The README's commands are real: every `mesh` command line in its ```sh
//! blocks parses as written (by the CLI's own grammar, `mesh::cli::
//! check_args`, nothing run), and every script or file of this repository
//! such a line names exists (scripts executable), and a `.deb` the README
//! names is this version's.
//!
//! Parsed, not run: the README's examples use addresses like 10.40.1.0/24
//! and host names, which the tests may not (198.18.0.0/15 only); what they
//! do is run by the integration tests.
//!
//! Lines are read as a reader would type them: a `host1# ` prompt dropped,
//! `\` continuations joined, `# comments` cut, quotes honoured. A `mesh`
//! command is one at a command position (a line's start, after `;`, `&&`,
//! `||`, `|`, `eval`, `sudo`) or in a `$(mesh ...)` substitution.

use std::path::Path;

const README: &str = include_str!("../README.md");

/// The ```sh blocks: (line number of the first line, the lines).
fn sh_blocks(text: &str) -> Vec<(usize, Vec<&str>)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, Vec<&str>)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match &mut current {
            None if t == "```sh" => current = Some((i + 2, Vec::new())),
            Some(_) if t.starts_with("```") => blocks.extend(current.take()),
            Some((_, lines)) => lines.push(line),
            None => {}
        }
    }
    blocks
}

/// The logical lines of a block, each with its README line number:
/// prompts dropped, continuations joined.
fn logical_lines(first: usize, lines: &[&str]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (k, raw) in lines.iter().enumerate() {
        let mut line = raw.trim().to_string();
        if pending.is_none() {
            // `host1# `, `outside# `: a prompt, not a comment.
            if let Some((prompt, rest)) = line.split_once("# ") {
                if !prompt.is_empty() && prompt.chars().all(|c| c.is_ascii_alphanumeric()) {
                    line = rest.trim().to_string();
                }
            }
        }
        let (cont, text) = match line.strip_suffix('\\') {
            Some(t) => (true, t.to_string()),
            None => (false, line),
        };
        let entry = pending.get_or_insert((first + k, String::new()));
        entry.1.push(' ');
        entry.1.push_str(&text);
        if !cont {
            out.extend(pending.take());
        }
    }
    out.extend(pending);
    out
}

/// A word of a shell line: its text (quotes removed) and whether any of it
/// was quoted.
#[derive(Debug, Clone, PartialEq)]
struct Word {
    text: String,
    quoted: bool,
}

/// Splits `line` into words as sh would (no expansion): quotes, `\`
/// escapes, a `#` starting a word begins a comment; `;`, `|`, `&&`, `||`
/// are words of their own.
fn words(line: &str) -> Result<Vec<Word>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    let flush = |cur: &mut String, quoted: &mut bool, in_word: &mut bool, out: &mut Vec<Word>| {
        if *in_word {
            out.push(Word {
                text: std::mem::take(cur),
                quoted: *quoted,
            });
        }
        *quoted = false;
        *in_word = false;
    };
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => flush(&mut cur, &mut quoted, &mut in_word, &mut out),
            '#' if !in_word => break,
            // `<host1's address>`: a placeholder for the reader, one word.
            '<' if !in_word && chars.peek() != Some(&'<') && chars.clone().any(|c| c == '>') => {
                in_word = true;
                quoted = true;
                cur.push('<');
                for ch in chars.by_ref() {
                    cur.push(ch);
                    if ch == '>' {
                        break;
                    }
                }
            }
            '\'' => {
                in_word = true;
                quoted = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err("unclosed '".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                quoted = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => cur.extend(chars.next()),
                        Some(ch) => cur.push(ch),
                        None => return Err("unclosed \"".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.extend(chars.next());
            }
            ';' | '|' | '&' => {
                flush(&mut cur, &mut quoted, &mut in_word, &mut out);
                let mut op = c.to_string();
                if chars.peek() == Some(&c) && c != ';' {
                    op.push(c);
                    chars.next();
                }
                out.push(Word {
                    text: op,
                    quoted: false,
                });
            }
            _ => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    flush(&mut cur, &mut quoted, &mut in_word, &mut out);
    Ok(out)
}

/// The `mesh` invocations of a line: the words after `mesh`.
fn mesh_invocations(words: &[Word]) -> Vec<Vec<String>> {
    const SEPARATORS: [&str; 5] = [";", "|", "||", "&&", "&"];
    const PREFIXES: [&str; 2] = ["eval", "sudo"];
    let mut found = Vec::new();
    let mut command_position = true;
    let mut i = 0;
    while i < words.len() {
        let w = &words[i];
        let substitution = !w.quoted && w.text == "$(mesh";
        if (command_position && !w.quoted && w.text == "mesh") || substitution {
            let mut args = Vec::new();
            i += 1;
            while i < words.len() {
                let a = &words[i];
                if !a.quoted && SEPARATORS.contains(&a.text.as_str()) {
                    break;
                }
                if !a.quoted && (a.text.starts_with('>') || a.text.starts_with('<')) {
                    break;
                }
                if substitution && !a.quoted && a.text.ends_with(')') {
                    let t = a.text.trim_end_matches(')');
                    if !t.is_empty() {
                        args.push(t.to_string());
                    }
                    i += 1;
                    break;
                }
                args.push(a.text.clone());
                i += 1;
            }
            found.push(args);
            command_position = false;
            continue;
        }
        command_position = (!w.quoted && SEPARATORS.contains(&w.text.as_str()))
            || (command_position && !w.quoted && PREFIXES.contains(&w.text.as_str()));
        i += 1;
    }
    found
}

#[test]
fn shell_words_and_invocations() {
    let ws = words(r#"eval $(mesh env --restore)   # DOCKER_HOST as it was"#).unwrap();
    assert_eq!(mesh_invocations(&ws), vec![vec!["env", "--restore"]]);
    let ws = words(r#"mesh run --name job -- sh -c 'ping -c1 web'   # x"#).unwrap();
    assert_eq!(
        mesh_invocations(&ws),
        vec![vec![
            "run",
            "--name",
            "job",
            "--",
            "sh",
            "-c",
            "ping -c1 web"
        ]]
    );
    let ws = words(r#"ln -sf "$(command -v mesh)" /opt/cni/bin/mesh"#).unwrap();
    assert!(mesh_invocations(&ws).is_empty());
    let ws = words("mesh stop && mesh launch 198.18.0.1 | cat").unwrap();
    assert_eq!(
        mesh_invocations(&ws),
        vec![vec!["stop"], vec!["launch", "198.18.0.1"]]
    );
    let lines = logical_lines(1, &["host2# mesh a \\", "    b  # c", "outside# ip r"]);
    assert_eq!(
        lines[0].1.split_whitespace().collect::<Vec<_>>(),
        ["mesh", "a", "b", "#", "c"]
    );
    assert_eq!(lines[1].0, 3);
    let ws = words("ip route add 10.40.3.0/24 via <host1's address>").unwrap();
    assert_eq!(
        ws.last().map(|w| w.text.as_str()),
        Some("<host1's address>")
    );
    assert!(mesh::cli::check_args(["launch", "--no-such-flag"]).is_err());
    assert!(mesh::cli::check_args(["status", "ipam"]).is_ok());
    let ws = words("cat > f <<'EOF2'").unwrap();
    assert_eq!(ws.last().map(|w| w.text.as_str()), Some("<<EOF2"));
}

/// Every `mesh` command of the README's ```sh blocks parses; every path
/// under scripts/, benches/ or contrib/ they name exists.
#[test]
fn readme_commands_parse_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for (first, lines) in sh_blocks(README) {
        // The terminator of a here-document being skipped.
        let mut heredoc: Option<String> = None;
        for (n, line) in logical_lines(first, &lines) {
            if let Some(end) = &heredoc {
                if line.trim() == end {
                    heredoc = None;
                }
                continue;
            }
            let ws = match words(&line) {
                Ok(ws) => ws,
                Err(e) => {
                    failures.push(format!("README line {n}: {e}: {line}"));
                    continue;
                }
            };
            heredoc = ws.iter().find_map(|w| {
                w.text
                    .strip_prefix("<<")
                    .map(|t| t.trim_start_matches('-').to_string())
            });
            for w in ws.iter().filter(|w| {
                ["scripts/", "benches/", "contrib/"]
                    .iter()
                    .any(|p| w.text.starts_with(p))
            }) {
                let p = root.join(&w.text);
                if !p.exists() {
                    failures.push(format!("README line {n}: {} does not exist", w.text));
                } else if w.text.ends_with(".sh") {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&p).map_or(0, |m| m.permissions().mode());
                    if mode & 0o111 == 0 {
                        failures.push(format!("README line {n}: {} is not executable", w.text));
                    }
                }
            }
            for args in mesh_invocations(&ws) {
                if let Err(e) = mesh::cli::check_args(&args) {
                    let first = e.lines().next().unwrap_or("").to_string();
                    failures.push(format!(
                        "README line {n}: `mesh {}`: {first}",
                        args.join(" ")
                    ));
                }
                checked.push(args.join(" "));
            }
        }
    }
    eprintln!("{} mesh commands of the README parsed", checked.len());
    assert!(
        failures.is_empty(),
        "README commands that do not run as written:\n{}",
        failures.join("\n")
    );
    // A package file named in the README is this version's.
    let want = format!("mesh_{}-1_", env!("CARGO_PKG_VERSION"));
    for (n, line) in README.lines().enumerate() {
        for (i, _) in line.match_indices("mesh_") {
            let rest = &line[i..];
            if rest.starts_with("mesh_*") || !rest[5..].starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            assert!(
                rest.starts_with(&want),
                "README line {}: a package of another version: {line}",
                n + 1
            );
        }
    }
    // The extraction itself works: the README's first steps are found.
    for want in ["launch", "launch 198.18.0.1", "env", "ps", "status ipam"] {
        assert!(
            checked.iter().any(|c| c == want),
            "`mesh {want}` not found among the README's commands: {checked:?}"
        );
    }
}
