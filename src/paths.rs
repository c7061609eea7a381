//! Where a peer keeps its files: `$MESH_RUN_DIR` (default `/run/mesh`) for
//! the control socket, pid file and log; `$MESH_DATA_DIR` (default
//! `/var/lib/mesh`) for the identity key and persisted state. Every path a
//! peer uses comes from here, so several peers can share one machine.

use std::path::PathBuf;

/// Files under the data directory ([`data_dir`], or the directory a test
/// hands a component), one name each, kept here so that every file the
/// daemon keeps is listed in one place.
pub const IDENTITY: &str = "identity.key";
/// The attached containers.
pub const CONTAINERS: &str = "containers.json";
/// The host's addresses on the bridge (`mesh expose`).
pub const EXPOSED: &str = "exposed.json";
/// The connection targets.
pub const TARGETS: &str = "targets.json";
/// The address ring, our claims, peers learned.
pub const IPAM: &str = "ipam.bin";
/// The name table.
pub const NAMES: &str = "names.bin";

/// The runtime directory.
pub fn run_dir() -> PathBuf {
    std::env::var_os("MESH_RUN_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/mesh"))
}

/// The data directory.
pub fn data_dir() -> PathBuf {
    std::env::var_os("MESH_DATA_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/mesh"))
}

/// The control socket.
pub fn socket() -> PathBuf {
    run_dir().join("mesh.sock")
}

/// The Docker API proxy's socket (`mesh env`).
pub fn docker_socket() -> PathBuf {
    run_dir().join("docker.sock")
}

/// The daemon's pid file.
pub fn pid_file() -> PathBuf {
    run_dir().join("mesh.pid")
}

/// The daemon's log when running in the background.
pub fn log_file() -> PathBuf {
    run_dir().join("mesh.log")
}

/// `--docker-host`: `unix://PATH` (the only form supported).
pub fn parse_docker_host(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => Err(format!(
            "{s:?} is not supported: give the Docker daemon's socket as unix:///PATH (e.g. unix:///var/run/docker.sock)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_host_forms() {
        assert_eq!(
            parse_docker_host("unix:///var/run/docker.sock"),
            Ok(PathBuf::from("/var/run/docker.sock"))
        );
        assert!(parse_docker_host("tcp://1.2.3.4:2375").is_err());
        assert!(parse_docker_host("unix://relative").is_err());
        assert!(parse_docker_host("/var/run/docker.sock").is_err());
    }
}
