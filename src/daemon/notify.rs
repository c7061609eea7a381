//! systemd's readiness protocol (`sd_notify(3)`), by hand: one datagram of
//! `KEY=VALUE` lines to the unix socket named by `$NOTIFY_SOCKET` (a path,
//! or `@name` in the abstract namespace). `contrib/mesh.service` is
//! `Type=notify`: the daemon says `READY=1` once it answers on its control
//! socket, and `STOPPING=1` when it begins to stop. Without
//! `$NOTIFY_SOCKET` (not under systemd) nothing is sent. A failure to
//! notify is logged, never fatal: the daemon works without systemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// Send `state` (e.g. `"READY=1\nSTATUS=…"`) to the service manager, if
/// there is one; `Ok(false)` when there is none.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET_ENV) else {
        return Ok(false);
    };
    let target = target.to_string_lossy().into_owned();
    if target.is_empty() {
        return Ok(false);
    }
    let addr = address(&target)?;
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}

/// `@name` is an abstract socket, anything else a path.
fn address(target: &str) -> std::io::Result<SocketAddr> {
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(target),
    }
}

/// [`notify`], with a failure logged as a warning.
pub fn notify_or_warn(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(
            "telling systemd {:?} through ${NOTIFY_SOCKET_ENV}: {e}",
            state.lines().next().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_addresses() {
        let a = address("@mesh-test").unwrap();
        use std::os::linux::net::SocketAddrExt;
        assert_eq!(a.as_abstract_name(), Some(&b"mesh-test"[..]));
        let p = address("/run/systemd/notify").unwrap();
        assert_eq!(
            p.as_pathname(),
            Some(std::path::Path::new("/run/systemd/notify"))
        );
    }
}
