//! The CNI plugin: the `mesh` binary acts as one when `CNI_COMMAND` is set,
//! so a network configuration names it with `"type": "mesh"` (DESIGN §7).
//!
//! The plugin holds no state of its own: ADD asks the local daemon, over
//! its control socket, to attach `CNI_NETNS` (with `CNI_IFNAME` as the
//! interface's name), DEL to detach it, CHECK whether it is still attached
//! and whole; the daemon owns addresses, rules and names as it does for
//! `mesh attach`. Results follow the CNI specification 1.0 (interfaces,
//! IPs, DNS); errors are the specification's JSON error on stdout with a
//! non-zero exit.
//!
//! Network configuration fields of our own: `socket` (the daemon's control
//! socket, default `/run/mesh/mesh.sock`) and `subnet` (ADDR forms as
//! `WEAVE_CIDR` takes them, default `net:default`). `WEAVE_CIDR=` or
//! `MESH_CIDR=` in `CNI_ARGS` overrides `subnet` for one container; the
//! container's own environment never reaches a CNI plugin.
//!
//! DEL succeeds when there is nothing to delete, as the specification
//! asks, and also when the daemon is not running: the daemon releases the
//! addresses of containers whose interface vanished while it was stopped,
//! so nothing is lost.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{self, ClientError, Request, Response};
use crate::attach::addr;
use crate::attach::DNS_ADDR;
use crate::host;

/// The versions whose results we write (1.0's shape; 0.3.x and 0.4.0 add
/// `"version": "4"` to each IP).
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How long an ADD may wait for the daemon (an allocation can wait for
/// address-space consensus).
const ADD_TIMEOUT: Duration = Duration::from_secs(120);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A CNI error: the specification's code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// 1 incompatible version, 3 unknown container, 4 bad environment,
    /// 5 I/O, 6 undecodable, 7 invalid configuration, 11 try again later,
    /// 50 plugin not available, 100 and up our own.
    pub code: u32,
    /// One line.
    pub msg: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
        }
    }
}

/// The network configuration's fields we read.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// The network's name.
    #[serde(default)]
    pub name: String,
    /// Our control socket.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// ADDR forms, separated by spaces or commas.
    #[serde(default)]
    pub subnet: Option<String>,
}

/// Parse and check the configuration given on stdin.
pub fn parse_conf(bytes: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(bytes)
        .map_err(|e| CniError::new(6, format!("network configuration: {e}")))?;
    if !SUPPORTED.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            1,
            format!(
                "cniVersion {} is not supported (supported: {})",
                conf.cni_version,
                SUPPORTED.join(", ")
            ),
        ));
    }
    if let Some(s) = &conf.subnet {
        addr::parse_list(s).map_err(|e| CniError::new(7, format!("subnet: {e}")))?;
    }
    Ok(conf)
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
pub fn parse_args(s: &str) -> BTreeMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The ADDR strings for a container: `WEAVE_CIDR`/`MESH_CIDR` from
/// `CNI_ARGS`, else the configuration's `subnet`, else `net:default`.
pub fn addrs_for(conf: &NetConf, args: &BTreeMap<String, String>) -> Result<Vec<String>, CniError> {
    let (from, list) = ["MESH_CIDR", "WEAVE_CIDR"]
        .iter()
        .find_map(|k| args.get(*k).map(|v| (*k, Some(v))))
        .unwrap_or(("subnet", conf.subnet.as_ref()));
    addr::addrs_or_default(list.map(String::as_str))
        .map_err(|e| CniError::new(7, format!("{from}: {e}")))
}

/// The name the daemon records the container under (and serves in DNS):
/// the runtime's name for it (`K8S_POD_NAME`, which podman sets to the
/// container's name) when it is a valid DNS label, else the first 12
/// characters of the container ID.
pub fn container_name(container_id: &str, args: &BTreeMap<String, String>) -> String {
    args.get("K8S_POD_NAME")
        .filter(|n| mesh_proto::names::normalize_name(n).is_ok() && !n.contains('.'))
        .cloned()
        .unwrap_or_else(|| container_id.chars().take(12).collect())
}

/// The ADD result.
pub fn add_result(
    version: &str,
    ifname: &str,
    mac: &str,
    netns: &str,
    cidrs: &[String],
    dns_domain: Option<&str>,
) -> Value {
    let legacy = version.starts_with("0.");
    let ips: Vec<Value> = cidrs
        .iter()
        .map(|c| {
            let mut ip = json!({"address": c, "interface": 0});
            if legacy {
                ip["version"] = json!("4");
            }
            ip
        })
        .collect();
    let mut r = json!({
        "cniVersion": version,
        "interfaces": [{"name": ifname, "mac": mac, "sandbox": netns}],
        "ips": ips,
    });
    r["dns"] = match dns_domain {
        Some(d) => json!({"nameservers": [DNS_ADDR.ip().to_string()], "search": [d]}),
        None => json!({}),
    };
    r
}

/// The `CNI_*` environment of one invocation.
struct Call {
    container_id: String,
    netns: String,
    ifname: String,
    args: BTreeMap<String, String>,
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_default()
}

fn need(k: &str) -> Result<String, CniError> {
    let v = env(k);
    if v.is_empty() {
        return Err(CniError::new(4, format!("{k} is not set")));
    }
    Ok(v)
}

/// Run as a CNI plugin: read the environment and stdin, print the result
/// or the error, and return the exit status.
pub fn main() -> ExitCode {
    let command = env("CNI_COMMAND");
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // The version to answer in: the configuration's when it parses.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(String::from)
        })
        .filter(|v| SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".into());
    let out = match read {
        Err(e) => Err(CniError::new(5, format!("reading stdin: {e}"))),
        Ok(_) => run(&command, &stdin),
    };
    match out {
        Ok(Some(v)) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!(
                "{}",
                json!({"cniVersion": version, "code": e.code, "msg": e.msg})
            );
            eprintln!("mesh (CNI {command}): {}", e.msg);
            ExitCode::from(1)
        }
    }
}

fn run(command: &str, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": "1.0.0",
            "supportedVersions": SUPPORTED,
        })));
    }
    let conf = parse_conf(stdin)?;
    let socket = conf.socket.clone().unwrap_or_else(crate::paths::socket);
    match command {
        "ADD" | "DEL" | "CHECK" => {}
        "STATUS" => {
            return match api::call(&socket, &Request::Status, CALL_TIMEOUT) {
                Ok(Response::Status(_)) => Ok(None),
                Ok(other) => Err(CniError::new(50, unexpected(other))),
                Err(e) => Err(CniError::new(50, format!("{e:#}"))),
            }
        }
        // Nothing of ours outlives a container's DEL.
        "GC" => return Ok(None),
        "" => return Err(CniError::new(4, "CNI_COMMAND is not set")),
        other => return Err(CniError::new(4, format!("unknown CNI_COMMAND {other}"))),
    }
    let call = Call {
        container_id: need("CNI_CONTAINERID")?,
        netns: env("CNI_NETNS"),
        ifname: need("CNI_IFNAME")?,
        args: parse_args(&env("CNI_ARGS")),
    };
    let name = container_name(&call.container_id, &call.args);
    match command {
        "ADD" => add(&socket, &call, &conf, &name).map(Some),
        "DEL" => del(&socket, &name).map(|()| None),
        _ => check(&socket, &call, &name).map(|()| None),
    }
}

fn unexpected(r: Response) -> String {
    crate::api::unexpected(r).to_string()
}

/// A failed call to the daemon: "not running" is worth retrying later.
fn daemon_error(e: anyhow::Error) -> CniError {
    let code = match e.downcast_ref::<ClientError>() {
        Some(ClientError::NotRunning(_)) => 11,
        _ => 5,
    };
    CniError::new(code, format!("{e:#}"))
}

fn add(socket: &Path, call: &Call, conf: &NetConf, name: &str) -> Result<Value, CniError> {
    if call.netns.is_empty() {
        return Err(CniError::new(4, "CNI_NETNS is not set"));
    }
    let addrs = addrs_for(conf, &call.args)?;
    let status = match api::call(socket, &Request::Status, CALL_TIMEOUT).map_err(daemon_error)? {
        Response::Status(s) => s,
        other => return Err(CniError::new(5, unexpected(other))),
    };
    let req = Request::Attach {
        addrs,
        name: Some(name.to_string()),
        target: call.netns.clone(),
        ifname: Some(call.ifname.clone()),
        hand_over: None,
        port: None,
    };
    let cidrs = match api::call(socket, &req, ADD_TIMEOUT).map_err(daemon_error)? {
        Response::Attached { cidrs } => cidrs,
        other => return Err(CniError::new(100, unexpected(other))),
    };
    let mac = ps_entry(socket, name)?
        .map(|e| e.mac)
        .ok_or_else(|| CniError::new(100, format!("{name} is not attached after ADD")))?;
    let domain = status
        .dns
        .as_ref()
        .filter(|d| d.serving)
        .map(|d| d.domain.trim_end_matches('.').to_string());
    Ok(add_result(
        &conf.cni_version,
        &call.ifname,
        &mac,
        &call.netns,
        &cidrs,
        domain.as_deref(),
    ))
}

fn ps_entry(socket: &Path, name: &str) -> Result<Option<api::PsEntry>, CniError> {
    match api::call(socket, &Request::Ps, CALL_TIMEOUT).map_err(daemon_error)? {
        Response::Ps { containers } => Ok(containers.into_iter().find(|c| c.id == name)),
        other => Err(CniError::new(5, unexpected(other))),
    }
}

fn del(socket: &Path, name: &str) -> Result<(), CniError> {
    let entry = match ps_entry(socket, name) {
        Ok(e) => e,
        // Released by the daemon's reconciliation when it starts.
        Err(e) if e.code == 11 => {
            eprintln!(
                "mesh (CNI DEL): {}; the daemon releases the container's addresses when it starts",
                e.msg
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if entry.is_none() {
        return Ok(());
    }
    let req = Request::Detach {
        addrs: Vec::new(),
        target: name.to_string(),
    };
    match api::call(socket, &req, CALL_TIMEOUT).map_err(daemon_error)? {
        Response::Ok => Ok(()),
        other => Err(CniError::new(100, unexpected(other))),
    }
    .or_else(|e| {
        // Gone between the two calls: what DEL wants.
        match ps_entry(socket, name) {
            Ok(None) => Ok(()),
            _ => Err(e),
        }
    })
}

fn check(socket: &Path, call: &Call, name: &str) -> Result<(), CniError> {
    let Some(entry) = ps_entry(socket, name)? else {
        return Err(CniError::new(
            3,
            format!("container {name} is not attached"),
        ));
    };
    if entry.cidrs.is_empty() {
        return Err(CniError::new(
            100,
            format!("container {name} holds no address"),
        ));
    }
    if call.netns.is_empty() {
        return Err(CniError::new(4, "CNI_NETNS is not set"));
    }
    let mac = interface_mac(&call.netns, &call.ifname)?;
    if !mac.eq_ignore_ascii_case(&entry.mac) {
        return Err(CniError::new(
            100,
            format!(
                "{} in {} has MAC {mac}, not the attached {}",
                call.ifname, call.netns, entry.mac
            ),
        ));
    }
    Ok(())
}

/// The MAC of `ifname` inside the namespace at `netns`, read over netlink
/// there (`/sys` would show this namespace's devices).
fn interface_mac(netns: &str, ifname: &str) -> Result<String, CniError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(5, format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        let (ns, _) =
            host::open_netns(netns).map_err(|e| CniError::new(3, format!("{netns}: {e}")))?;
        let nl = host::Netlink::in_netns(&ns)
            .await
            .map_err(|e| CniError::new(5, e.to_string()))?;
        let mac = nl
            .link_mac(ifname)
            .await
            .map_err(|e| CniError::new(3, format!("{ifname} in {netns}: {e}")))?;
        Ok(mesh_proto::name::mac_string(mac))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        parse_conf(
            format!(r#"{{"cniVersion":"1.0.0","name":"mesh","type":"mesh"{extra}}}"#).as_bytes(),
        )
    }

    #[test]
    fn configuration() {
        let c = conf(r#","socket":"/tmp/x.sock","subnet":"net:198.19.2.0/24""#).unwrap();
        assert_eq!(
            c.socket.as_deref(),
            Some(std::path::Path::new("/tmp/x.sock"))
        );
        assert_eq!(
            addrs_for(&c, &BTreeMap::new()).unwrap(),
            vec!["net:198.19.2.0/24"]
        );
        let d = conf("").unwrap();
        assert_eq!(
            addrs_for(&d, &BTreeMap::new()).unwrap(),
            vec!["net:default"]
        );
        assert_eq!(conf(r#","subnet":"net:banana""#).unwrap_err().code, 7);
        assert_eq!(parse_conf(b"{").unwrap_err().code, 6);
        let old = parse_conf(br#"{"cniVersion":"0.2.0","name":"m"}"#).unwrap_err();
        assert_eq!(old.code, 1);
        assert!(old.msg.contains("0.2.0"), "{}", old.msg);
    }

    #[test]
    fn args_override_the_subnet_and_name_the_container() {
        let a = parse_args("IgnoreUnknown=1;K8S_POD_NAME=web;WEAVE_CIDR=net:198.19.3.0/24");
        let c = conf(r#","subnet":"net:198.19.2.0/24""#).unwrap();
        assert_eq!(addrs_for(&c, &a).unwrap(), vec!["net:198.19.3.0/24"]);
        assert_eq!(container_name("0123456789abcdef", &a), "web");
        let bad = parse_args("K8S_POD_NAME=not a name");
        assert_eq!(container_name("0123456789abcdef", &bad), "0123456789ab");
        let wrong = parse_args("MESH_CIDR=ip:300.1.1.1/24");
        assert_eq!(addrs_for(&c, &wrong).unwrap_err().code, 7);
    }

    #[test]
    fn results() {
        let cidrs = vec!["198.19.2.5/24".to_string()];
        let r = add_result(
            "1.0.0",
            "eth0",
            "aa:bb:cc:dd:ee:ff",
            "/run/netns/x",
            &cidrs,
            Some("mesh.local"),
        );
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}],
                "ips": [{"address": "198.19.2.5/24", "interface": 0}],
                "dns": {"nameservers": ["127.0.0.11"], "search": ["mesh.local"]},
            })
        );
        let old = add_result(
            "0.4.0",
            "eth0",
            "aa:bb:cc:dd:ee:ff",
            "/run/netns/x",
            &cidrs,
            None,
        );
        assert_eq!(old["ips"][0]["version"], "4");
        assert_eq!(old["dns"], json!({}));
    }
}
