//! Host plumbing over netlink: the bridge, container veth pairs, network
//! namespaces and the sleeve's TAP device.
//!
//! Everything here talks to the kernel through rtnetlink sockets; no `ip`
//! commands are run. Invariants:
//!
//! - The daemon's own threads never change namespace. Work inside another
//!   network namespace is done either by a netlink socket created on a
//!   short-lived thread that `setns()`'d into it (a socket stays bound to the
//!   namespace it was created in, see [`Netlink::in_netns`]) or by
//!   [`run_in_netns`], which runs a closure on such a thread.
//! - Every operation is idempotent where the daemon may repeat it after a
//!   crash (bridge creation, deleting links, attaching a container twice).
//! - A failed attach leaves nothing behind: the veth pair is one kernel
//!   object and is removed as a whole by deleting its host end.
//!
//! Files: [`netns`] (namespace handles), [`netlink`] (the [`Netlink`] handle,
//! bridge, link queries, underlay MTU), [`veth`] (container attach/detach),
//! [`tap`] (the sleeve's TAP), [`nft`] (isolation rules on the bridge; these
//! are the one part done by running a command, `nft`).

pub mod netlink;
pub mod netns;
pub mod nft;
pub mod tap;
pub mod veth;
pub mod vxlan;

#[cfg(test)]
mod testutil;

/// The bridge containers are attached to.
pub const BRIDGE: &str = "mesh";
/// The sleeve's TAP on the bridge.
pub const TAP: &str = "meshtap";

pub use netlink::Netlink;
pub use netns::{hostname_of, open_netns, run_in_netns, NetnsId};
pub use tap::{open_tap, Tap};
pub use veth::{
    add_addrs, add_default_route, attach_veth, container_if, del_addrs, del_default_route,
    detach_veth, ContainerIf,
};

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Errors of the host plumbing. Each names the object it concerns.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A TARGET path that does not exist.
    #[error("no such network namespace: {0}")]
    NoSuchNetns(String),
    /// A TARGET PID with no process behind it.
    #[error("no such process: {0}")]
    NoSuchProcess(u32),
    /// A TARGET path that exists but is not a network namespace.
    #[error("not a network namespace: {0}")]
    NotNetns(String),
    /// A link that was expected to exist does not.
    #[error("no such link: {0}")]
    NoSuchLink(String),
    /// A link of the given name exists but has the wrong kind.
    #[error("link {name} exists but is not a {expected}")]
    WrongKind {
        /// Interface name.
        name: String,
        /// What it should have been ("bridge").
        expected: &'static str,
    },
    /// A caller passed an interface name the kernel cannot take.
    #[error("invalid interface name {0:?}: must be 1 to 15 bytes, no '/', ':' or whitespace")]
    InvalidIfname(String),
    /// A netlink request failed.
    #[error("netlink {op}: {source}")]
    Netlink {
        /// What was being done, with the object's name.
        op: String,
        /// The error from rtnetlink (kernel errno inside).
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A helper thread running inside a namespace panicked or could not start.
    #[error("namespace helper thread failed: {0}")]
    Thread(String),
}

impl HostError {
    pub(crate) fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        HostError::Io {
            op: op.into(),
            source,
        }
    }

    pub(crate) fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        HostError::Netlink {
            op: op.into(),
            source,
        }
    }

    /// The kernel errno (positive) behind a netlink error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            HostError::Netlink { source, .. } => netlink_errno(source),
            HostError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// The positive errno carried by an rtnetlink error, if it is a kernel error.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Check that `name` is a valid interface name before the kernel sees it.
pub(crate) fn check_ifname(name: &str) -> Result<(), HostError> {
    let bad = name.is_empty()
        || name.len() > MAX_IFNAME_LEN
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0);
    if bad {
        Err(HostError::InvalidIfname(name.to_string()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifname_validation() {
        assert!(check_ifname("ethmesh").is_ok());
        assert!(check_ifname("abcdefghijklmno").is_ok());
        assert!(check_ifname("abcdefghijklmnop").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(check_ifname("a b").is_err());
        assert!(check_ifname("..").is_err());
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            HostError::NoSuchNetns("/run/netns/x".into()).to_string(),
            "no such network namespace: /run/netns/x"
        );
        assert_eq!(
            HostError::NoSuchProcess(1234).to_string(),
            "no such process: 1234"
        );
    }
}
