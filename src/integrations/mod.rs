//! Ways in from other tools: the Docker API proxy ([`proxy`], `mesh env`),
//! the CNI plugin ([`cni`], the binary itself when `CNI_COMMAND` is set),
//! both asking the daemon over its control socket as the CLI does, and the
//! Docker network plugin ([`plugin`], served by the daemon itself).
//! [`docker`] resolves Docker container names and IDs given as TARGET.

pub mod cni;
pub mod docker;
pub mod plugin;
pub mod proxy;
