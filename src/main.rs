//! `mesh`: a container network for Linux hosts.
//!
//! One binary is both the CLI and the daemon (`mesh launch --foreground`).
//! Every error reaching `main` is printed as one line on stderr with a
//! non-zero exit; nothing here panics on user input.

use std::process::ExitCode;

fn main() -> ExitCode {
    // A container runtime calls us as a CNI plugin ("type": "mesh").
    if std::env::var_os("CNI_COMMAND").is_some() {
        return mesh::integrations::cni::main();
    }
    match mesh::cli::run() {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of causes joined, no debug dump.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("mesh: {msg}");
            ExitCode::from(1)
        }
    }
}
