//! # mesh-proto: wire formats and sans-IO protocol cores
//!
//! This crate is to `mesh` what `quinn-proto` is to `quinn`: it holds every
//! byte layout that crosses the network and the protocol state machines that
//! interpret them, and it contains no networking code, no runtime and no
//! clock. Time comes in as an argument; the daemon (`src/` of the `mesh`
//! package) owns sockets, the TAP device, netlink and tasks.
//!
//! Modules, from the outside in:
//!
//! - [`name`]: peer names (derived from a peer's static public key).
//! - [`hello`]: the plaintext preamble of the control channel (TCP 6783) that
//!   negotiates the protocol version.
//! - [`frame`]: length-prefixed records on the control channel (handshake,
//!   transport, refusal).
//! - [`handshake`]: the Noise (`XX` / `XXpsk3`) handshake and the encrypted
//!   transport that follows it; the password-derived PSK.
//! - [`beat`]: adaptive heartbeats (fast while establishing or after
//!   silence, slow while healthy), shared by every path to a neighbour.
//! - [`conn`]: one control connection as a sans-IO state machine: hellos,
//!   handshake, introductions, heartbeats, gossip, close.
//! - [`control`]: the messages carried inside the encrypted control channel.
//! - [`sleeve`]: the UDP 6783 datagram format: header, frame records,
//!   fragments of super-frames, and packing of frames into datagrams.
//! - [`forward`]: the sleeve's forwarding decision (where a frame from the
//!   TAP or from a neighbour goes) and MAC learning, as pure functions.
//! - [`seal`]: ChaCha20-Poly1305 sealing of sleeve datagrams with counter
//!   nonces and a replay window.
//! - [`rekey`]: replacing sleeve keys (when, and which keys a receiver
//!   still accepts during the overlap).
//! - [`reassembly`]: reassembly of super-frames carried as fragments.
//! - [`sign`]: peer identities (one Ed25519 seed gives the signing key,
//!   the Noise key and the name), signatures on replicated state, and the
//!   book of pinned keys.
//! - [`gossip`]: the gossip and topology core: peers, connections, routes,
//!   broadcast trees, named channels for IPAM and DNS.
//! - [`ipam`]: the IP address allocator: a ring of address pieces shared as
//!   a CRDT over a gossip channel, created and reclaimed by Paxos.
//! - [`names`]: the mesh-wide DNS name table, a CRDT on the gossip channel
//!   `dns` (entries per peer, container and address; tombstones).
//! - [`sim`]: a deterministic simulator of many gossip cores on a virtual
//!   clock (latency, loss, partitions, crashes).
//!
//! Every decoder returns an error for every malformed input and never panics;
//! every length read from the wire is checked before anything is allocated.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod beat;
pub mod conn;
pub mod control;
pub mod fastdp;
pub mod forward;
pub mod frame;
pub mod gossip;
pub mod handshake;
pub mod hello;
mod intern;
pub mod ipam;
pub mod name;
pub mod names;
pub mod pmtu;
pub mod reassembly;
pub mod rekey;
pub mod seal;
pub mod sign;
pub mod sim;
pub mod sleeve;

/// The newest protocol version this build speaks (2: the `Intro` carries
/// the fast-path offer; 3, mesh 0.2: identities are Ed25519 keys and
/// gossiped state is signed by its writer; 4, mesh 0.3: sleeve format 3,
/// with a hop count in the header and sealed path MTU acknowledgements).
pub const PROTOCOL_VERSION: u8 = 4;
/// The oldest protocol version this build still speaks (a 0.2 peer speaks
/// the sleeve format 2, which this build cannot read, so it is refused,
/// with both releases named).
pub const PROTOCOL_MIN_VERSION: u8 = 4;

/// Why bytes from the network were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than the structure needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// The structure being parsed.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A magic number or marker did not match.
    #[error("bad magic in {0}")]
    BadMagic(&'static str),
    /// A type or kind byte this version does not know.
    #[error("unknown {what} {value}")]
    Unknown {
        /// The field.
        what: &'static str,
        /// Its value.
        value: u8,
    },
    /// A length field is larger than allowed.
    #[error("{what} length {len} exceeds the limit of {max}")]
    TooLong {
        /// The field.
        what: &'static str,
        /// Its value.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes left over after a complete structure.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A field holds a value that cannot be valid.
    #[error("invalid {0}")]
    Invalid(&'static str),
}
