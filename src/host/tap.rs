//! The sleeve's TAP device: an L2 tun/tap port of the bridge through which
//! the daemon reads and writes Ethernet frames.
//!
//! Framing (IFF_VNET_HDR): every read yields a 10-byte `virtio_net_hdr`
//! followed by an Ethernet frame, possibly a GSO super-frame of up to 64 KB
//! that the header describes; every write takes the same (an all-zero header
//! means "a plain frame, checksums complete").
//!
//! The TAP is multi-queue: one queue (file descriptor) per sleeve sender
//! thread, so that flows spread over cores. Offloads (checksum, TSO4/6,
//! TSO with ECN, and UDP segmentation where the kernel has it) are set on
//! every open: the setting is device-wide and would otherwise be whatever a
//! previous owner left.
//!
//! Invariants: the TAP is created inside the namespace of the [`Netlink`]
//! handle given (on a helper thread, never by moving the caller), is not
//! persistent (it disappears when the last fd closes, so a crashed daemon
//! leaves none behind unless another process holds it), and one left over
//! under the same name is deleted before the new one is made.

use std::os::fd::AsRawFd;
use tun_rs::{DeviceBuilder, Layer, SyncDevice};

use super::error::{check_ifname, HostError};
use super::netlink::Netlink;

/// Length of the `virtio_net_hdr` that prefixes every frame.
pub const VNET_HDR_LEN: usize = 10;

/// The sleeve's TAP.
pub struct Tap {
    /// Its queues (at least one); read and write frames with `recv`/`send`.
    pub queues: Vec<SyncDevice>,
    /// Interface name.
    pub name: String,
    /// The TAP's own MAC address.
    pub mac: [u8; 6],
    /// Whether frames carry a `virtio_net_hdr` (offloads on).
    pub vnet_hdr: bool,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("mac", &self.mac)
            .field("vnet_hdr", &self.vnet_hdr)
            .field("queues", &self.queues.len())
            .finish()
    }
}

/// `TUNSETOFFLOAD` flags beyond what tun-rs sets.
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// Add TSO with ECN to the offloads of a queue, keeping the rest: without it
/// the kernel segments ECN-marked TCP before it reaches us.
fn add_tso_ecn(q: &SyncDevice, udp: bool) {
    let mut flags = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | TUN_F_TSO_ECN;
    if udp {
        flags |= libc::TUN_F_USO4 | libc::TUN_F_USO6;
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a live TAP.
    let r = unsafe { libc::ioctl(q.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) };
    if r != 0 {
        tracing::debug!(
            "TUNSETOFFLOAD with TSO_ECN: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Create TAP `name` with IFF_VNET_HDR offloads and `queues` queues in
/// `nl`'s namespace, set its MTU to `mtu`, make it a port of `bridge` and
/// set it up. A TAP (or any link) of the same name is deleted first.
pub async fn open_tap(
    nl: &Netlink,
    name: &str,
    bridge: &str,
    mtu: u32,
    queues: usize,
) -> Result<Tap, HostError> {
    check_ifname(name)?;
    let bridge_index = nl
        .link_index(bridge)
        .await?
        .ok_or_else(|| HostError::NoSuchLink(bridge.to_string()))?;
    if nl.link_index(name).await?.is_some() {
        tracing::warn!(tap = name, "deleting leftover link before creating TAP");
        nl.delete_link(name).await?;
    }
    let owned = name.to_string();
    let n = queues.max(1);
    let queues: Vec<SyncDevice> = nl
        .run_in(move || -> std::io::Result<Vec<SyncDevice>> {
            let first = DeviceBuilder::new()
                .name(owned)
                .layer(Layer::L2)
                .with(|b| {
                    b.offload(true);
                    b.multi_queue(true);
                })
                .build_sync()?;
            let mut qs = Vec::with_capacity(n);
            for _ in 1..n {
                qs.push(first.try_clone()?);
            }
            qs.insert(0, first);
            Ok(qs)
        })?
        .map_err(|e| HostError::io(format!("create TAP {name}"), e))?;
    // From here the TAP exists; dropping the queues on error removes it.
    let vnet_hdr = queues[0].tcp_gso();
    if vnet_hdr {
        let udp = queues[0].udp_gso();
        for q in &queues {
            add_tso_ecn(q, udp);
        }
    }
    let index = nl.require_index(name).await?;
    nl.enslave(
        index,
        bridge_index,
        Some(mtu),
        true,
        &format!("configure TAP {name}"),
    )
    .await?;
    let mac = nl.link_mac(name).await?;
    tracing::info!(
        tap = name,
        bridge,
        mtu,
        vnet_hdr,
        queues = queues.len(),
        "opened TAP"
    );
    Ok(Tap {
        queues,
        name: name.to_string(),
        mac,
        vnet_hdr,
    })
}

#[cfg(test)]
#[path = "tap_tests.rs"]
mod tests;
