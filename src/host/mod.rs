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

mod error;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod nftnl;
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
    add_addrs, add_default_route, announce, attach_veth, container_if, del_addrs,
    del_default_route, detach_veth, link_with_mac, make_veth_pair, packet_socket, ContainerIf,
};

pub(crate) use error::check_ifname;
pub use error::{HostError, MAX_IFNAME_LEN};

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
