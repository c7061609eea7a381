//! The data path: how frames travel between hosts. The sleeve
//! ([`sleeve`]: Ethernet frames from a TAP on the bridge, over UDP, sealed
//! when a password is set, under keys that [`keys`] holds and rekeying
//! replaces; relaying for peers that cannot reach each
//! other), its batched UDP I/O ([`udpio`]), and the kernel VXLAN fast path
//! ([`fastdp`]) used where both ends can. Where a frame goes is decided by
//! the pure functions of [`mesh_proto::forward`].

pub mod fastdp;
pub mod keys;
pub mod sleeve;
pub mod udpio;
