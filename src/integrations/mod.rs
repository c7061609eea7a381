//! Ways in from other tools: the Docker API proxy ([`proxy`], `mesh env`)
//! and the CNI plugin ([`cni`], the binary itself when `CNI_COMMAND` is
//! set). Each asks the daemon over its control socket, as the CLI does.
//! [`docker`] resolves Docker container names and IDs given as TARGET.

pub mod cni;
pub mod docker;
pub mod proxy;
