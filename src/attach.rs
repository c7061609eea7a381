//! Attached containers: the one task that attaches, detaches and lists
//! them, and keeps the list in `$MESH_DATA_DIR/containers.json` (written
//! atomically), so that `mesh ps` survives a restart of the daemon. The
//! interfaces themselves live in the kernel and outlive the daemon.
//!
//! Invariant: no address is held by two attached containers of this peer.
//! (Mesh-wide uniqueness is the allocator's job, with its own issue.)

use crate::addr::{self, Addr};
use crate::api::{PsEntry, Request, Response};
use crate::daemon::BRIDGE;
use crate::host::{self, Netlink, NetnsId};
use crate::persist;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot};
use tracing::info;

/// The container-side interface name.
pub const IFNAME: &str = "ethmesh";

/// A request for the manager, with where to answer.
pub struct Cmd {
    /// Attach, Detach or Ps.
    pub req: Request,
    /// The answer.
    pub reply: oneshot::Sender<Response>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Attachment {
    id: String,
    name: Option<String>,
    target: String,
    netns: NetnsId,
    host_ifname: String,
    mac: String,
    cidrs: Vec<IpNet>,
}

/// Owns the list of attached containers.
pub struct Manager {
    nl: Netlink,
    path: PathBuf,
    mtu: u32,
    list: Vec<Attachment>,
}

fn fnv(netns: NetnsId) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in netns
        .dev
        .to_le_bytes()
        .iter()
        .chain(netns.ino.to_le_bytes().iter())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn mac_string(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Manager {
    /// Load the persisted list, keeping only containers whose interface
    /// still exists.
    pub async fn load(nl: Netlink, data_dir: PathBuf, mtu: u32) -> anyhow::Result<Manager> {
        let path = data_dir.join("containers.json");
        let stored: Vec<Attachment> = persist::load_json(&path)?.unwrap_or_default();
        let before = stored.len();
        let mut list = Vec::new();
        for a in stored {
            if nl.link_index(&a.host_ifname).await?.is_some() {
                list.push(a);
            } else {
                info!(container = %a.id, "container gone while we were stopped; released");
            }
        }
        let m = Manager {
            nl,
            path,
            mtu,
            list,
        };
        if m.list.len() != before {
            m.save()?;
        }
        Ok(m)
    }

    fn save(&self) -> anyhow::Result<()> {
        persist::save_json(&self.path, &self.list)
    }

    /// Serve requests until the channel closes.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        while let Some(Cmd { req, reply }) = rx.recv().await {
            let resp = match req {
                Request::Attach {
                    addrs,
                    name,
                    target,
                } => match self.attach(&addrs, name, &target).await {
                    Ok(cidrs) => Response::Attached { cidrs },
                    Err(message) => Response::Error { message },
                },
                Request::Detach { addrs, target } => match self.detach(&addrs, &target).await {
                    Ok(()) => Response::Ok,
                    Err(message) => Response::Error { message },
                },
                Request::Ps => Response::Ps {
                    containers: self
                        .list
                        .iter()
                        .map(|a| PsEntry {
                            id: a.id.clone(),
                            mac: a.mac.clone(),
                            cidrs: a.cidrs.iter().map(|c| c.to_string()).collect(),
                        })
                        .collect(),
                },
                _ => Response::Error {
                    message: "not an attachment request".into(),
                },
            };
            let _ = reply.send(resp);
        }
    }

    fn fixed_addrs(addrs: &[String]) -> Result<Vec<IpNet>, String> {
        let mut out = Vec::new();
        for a in addrs {
            match addr::parse(a)? {
                Addr::Ip(n) => out.push(n),
                Addr::None => {}
                Addr::Net(_) | Addr::NetDefault => {
                    return Err(format!(
                        "cannot allocate for {a}: automatic address allocation (IPAM) is not available in this version; give a fixed address with ip:CIDR"
                    ))
                }
            }
        }
        Ok(out)
    }

    async fn attach(
        &mut self,
        addrs: &[String],
        name: Option<String>,
        target: &str,
    ) -> Result<Vec<String>, String> {
        let wanted = Self::fixed_addrs(addrs)?;
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let (ns, id) = host::open_netns(target).map_err(|e| e.to_string())?;
        let existing = self.list.iter().position(|a| a.netns == id);
        for w in &wanted {
            if let Some(other) = self
                .list
                .iter()
                .find(|a| a.netns != id && a.cidrs.iter().any(|c| c.addr() == w.addr()))
            {
                return Err(format!(
                    "address {} is already attached to container {}",
                    w.addr(),
                    other.id
                ));
            }
        }
        let hash = fnv(id);
        let cid = name
            .clone()
            .unwrap_or_else(|| format!("{:012x}", hash & 0xffff_ffff_ffff));
        if let Some(other) = self.list.iter().find(|a| a.netns != id && a.id == cid) {
            return Err(format!(
                "container name {cid} is already used by another attached container ({})",
                other.target
            ));
        }
        let host_ifname = match existing {
            Some(i) => self.list[i].host_ifname.clone(),
            None => format!("vmesh{:08x}", hash as u32),
        };
        let cif = host::attach_veth(
            &self.nl,
            &ns,
            BRIDGE,
            &host_ifname,
            IFNAME,
            &wanted,
            self.mtu,
        )
        .await
        .map_err(|e| format!("attaching {target}: {e}"))?;
        let mac = mac_string(cif.mac);
        match existing {
            Some(i) => {
                let a = &mut self.list[i];
                for w in &wanted {
                    if !a.cidrs.contains(w) {
                        a.cidrs.push(*w);
                    }
                }
                a.mac = mac;
                if name.is_some() {
                    a.id = cid.clone();
                    a.name = name;
                }
            }
            None => self.list.push(Attachment {
                id: cid.clone(),
                name,
                target: target.to_string(),
                netns: id,
                host_ifname,
                mac,
                cidrs: wanted.clone(),
            }),
        }
        self.save().map_err(|e| format!("{e:#}"))?;
        info!(container = %cid, addrs = ?wanted, "attached");
        Ok(wanted.iter().map(|c| c.to_string()).collect())
    }

    async fn detach(&mut self, addrs: &[String], target: &str) -> Result<(), String> {
        let release = Self::fixed_addrs(addrs)?;
        let opened = host::open_netns(target).ok();
        let idx = self
            .list
            .iter()
            .position(|a| opened.as_ref().is_some_and(|(_, id)| a.netns == *id))
            .or_else(|| {
                self.list
                    .iter()
                    .position(|a| a.id == target || a.target == target)
            })
            .ok_or_else(|| format!("no attached container matches {target}"))?;
        let all = release.is_empty();
        let a = self.list[idx].clone();
        host::detach_veth(
            &self.nl,
            opened.as_ref().map(|(f, _)| f),
            &a.host_ifname,
            IFNAME,
            if all { &a.cidrs } else { &release },
            all,
        )
        .await
        .map_err(|e| format!("detaching {target}: {e}"))?;
        let remaining: Vec<IpNet> = if all {
            Vec::new()
        } else {
            a.cidrs
                .iter()
                .filter(|c| !release.contains(c))
                .copied()
                .collect()
        };
        if remaining.is_empty() {
            self.list.remove(idx);
        } else {
            self.list[idx].cidrs = remaining;
        }
        self.save().map_err(|e| format!("{e:#}"))?;
        info!(container = %a.id, "detached");
        Ok(())
    }
}
