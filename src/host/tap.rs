//! The sleeve's TAP device: an L2 tun/tap port of the bridge through which
//! the daemon reads and writes Ethernet frames.
//!
//! Framing (IFF_VNET_HDR): every read yields a 10-byte `virtio_net_hdr`
//! followed by an Ethernet frame, possibly a GSO super-frame of up to 64 KB
//! that the header describes; every write takes the same (an all-zero header
//! means "a plain frame, checksums complete").
//!
//! Invariants: the TAP is created inside the namespace of the [`Netlink`]
//! handle given (on a helper thread, never by moving the caller), is not
//! persistent (it disappears when the last fd closes, so a crashed daemon
//! leaves none behind unless another process holds it), and one left over
//! under the same name is deleted before the new one is made.

use tun_rs::{AsyncDevice, DeviceBuilder, Layer, SyncDevice};

use super::{check_ifname, HostError, Netlink};

/// Length of the `virtio_net_hdr` that prefixes every frame.
pub const VNET_HDR_LEN: usize = 10;

/// The sleeve's TAP.
pub struct Tap {
    /// The device; read and write frames with `recv`/`send`.
    pub dev: AsyncDevice,
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
            .finish()
    }
}

/// Create TAP `name` with IFF_VNET_HDR offloads in `nl`'s namespace, set
/// its MTU to `mtu`, make it a port of `bridge` and set it up. A TAP (or
/// any link) of the same name is deleted first.
pub async fn open_tap(nl: &Netlink, name: &str, bridge: &str, mtu: u32) -> Result<Tap, HostError> {
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
    let sync: SyncDevice = nl
        .run_in(move || {
            DeviceBuilder::new()
                .name(owned)
                .layer(Layer::L2)
                .with(|b| {
                    b.offload(true);
                })
                .build_sync()
        })?
        .map_err(|e| HostError::io(format!("create TAP {name}"), e))?;
    let vnet_hdr = sync.tcp_gso();
    // From here the TAP exists; dropping `sync`/`dev` on error removes it.
    let dev = AsyncDevice::new(sync)
        .map_err(|e| HostError::io(format!("register TAP {name} with tokio"), e))?;
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
    tracing::info!(tap = name, bridge, mtu, vnet_hdr, "opened TAP");
    Ok(Tap {
        dev,
        name: name.to_string(),
        mac,
        vnet_hdr,
    })
}

#[cfg(test)]
#[path = "tap_tests.rs"]
mod tests;
