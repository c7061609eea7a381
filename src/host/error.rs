//! The host plumbing's errors and the checks every part shares. A leaf of
//! the folder: the other files import it, it imports none of them.

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
