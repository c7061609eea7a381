//! The report (`mesh report`, `/status`, the metrics): the router's
//! status with the connection maker's targets and the drop counters of
//! the host's nftables rules. Shared by the control socket and the HTTP
//! listener.

use crate::api::Status;
use crate::host;
use crate::router::{self, connmaker};
use tokio::sync::{mpsc, oneshot};

/// The router's part of the status (no targets, no nftables counters);
/// `None` once the router is gone (the daemon is stopping).
pub async fn router_part(router: &mpsc::Sender<router::Cmd>) -> Option<Status> {
    let (reply, rx) = oneshot::channel();
    router.send(router::Cmd::Status(reply)).await.ok()?;
    rx.await.ok()
}

/// The whole report; `None` once the router is gone.
pub async fn full(
    router: &mpsc::Sender<router::Cmd>,
    connmaker: &mpsc::Sender<connmaker::Cmd>,
) -> Option<Status> {
    let mut status = router_part(router).await?;
    let (reply, rx) = oneshot::channel();
    if connmaker.send(connmaker::Cmd::Targets(reply)).await.is_ok() {
        status.targets = rx.await.unwrap_or_default();
    }
    match host::nft::counters().await {
        Ok(c) => status.drops = c,
        Err(e) => status
            .problems
            .push(format!("reading the drop counters: {e}")),
    }
    Some(status)
}
