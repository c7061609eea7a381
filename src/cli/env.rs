//! `mesh env`: the shell commands that point the `docker` CLI at the
//! proxy, and back.

/// `mesh env [--restore]`: shell commands for `eval`.
pub fn env_commands(
    restore: bool,
    docker_host: Option<&str>,
    orig: Option<&str>,
    proxy: &str,
) -> String {
    let docker_host = docker_host.unwrap_or("");
    let orig = orig.unwrap_or("");
    if restore {
        if docker_host != proxy {
            // Not pointing at the proxy: nothing to restore.
            return String::new();
        }
        return if orig.is_empty() {
            "unset DOCKER_HOST ORIG_DOCKER_HOST".to_string()
        } else {
            format!(
                "export DOCKER_HOST={}; unset ORIG_DOCKER_HOST",
                shell_quote(orig)
            )
        };
    }
    // Already pointing at the proxy: keep what was saved before.
    let saved = if docker_host == proxy {
        orig
    } else {
        docker_host
    };
    format!(
        "export DOCKER_HOST={} ORIG_DOCKER_HOST={}",
        shell_quote(proxy),
        shell_quote(saved)
    )
}

/// A word the shell reads back as `s`.
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/_.:-=@%+,".contains(c);
    if s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: &str = "unix:///run/mesh/docker.sock";

    #[test]
    fn env_saves_and_restores_docker_host() {
        assert_eq!(
            env_commands(false, None, None, PROXY),
            "export DOCKER_HOST=unix:///run/mesh/docker.sock ORIG_DOCKER_HOST="
        );
        assert_eq!(
            env_commands(false, Some("tcp://h:2375"), None, PROXY),
            "export DOCKER_HOST=unix:///run/mesh/docker.sock ORIG_DOCKER_HOST=tcp://h:2375"
        );
        // Twice in a row keeps the first saved value.
        assert_eq!(
            env_commands(false, Some(PROXY), Some("tcp://h:2375"), PROXY),
            "export DOCKER_HOST=unix:///run/mesh/docker.sock ORIG_DOCKER_HOST=tcp://h:2375"
        );
        assert_eq!(
            env_commands(true, Some(PROXY), Some("tcp://h:2375"), PROXY),
            "export DOCKER_HOST=tcp://h:2375; unset ORIG_DOCKER_HOST"
        );
        assert_eq!(
            env_commands(true, Some(PROXY), Some(""), PROXY),
            "unset DOCKER_HOST ORIG_DOCKER_HOST"
        );
        assert_eq!(env_commands(true, Some("tcp://x"), None, PROXY), "");
        assert_eq!(shell_quote("a b'c"), r"'a b'\''c'");
    }
}
