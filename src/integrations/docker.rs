//! Containers named the Docker way: `mesh attach app`, `mesh detach 3f2a`,
//! `mesh dns-add IP app` (DESIGN §2: TARGET may be a container ID or name
//! resolved through the Docker API the proxy forwards to). The daemon asks
//! its `--docker-host` (`GET /containers/{id}/json`, which takes a name, a
//! full ID or an unambiguous ID prefix) for the container's init PID, name
//! and environment, and from there on the container is what its PID names.
//!
//! [`resolve`] is the one place that turns such a reference into a
//! container; [`is_reference`] tells which TARGETs may be one (neither a
//! PID nor a path); [`resolve_request`] rewrites a control request whose
//! TARGET is one (the daemon does so before the attach manager sees it, so
//! a slow Docker daemon never holds up the manager). Every failure is one
//! line that names the socket asked.

use crate::api::Request;
use crate::attach::addr;
use crate::integrations::proxy::{docker_get, encode, Inspected};
use std::path::Path;
use std::time::Duration;

/// How long asking the Docker daemon may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(15);

/// A running container the Docker API knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerContainer {
    /// Its full ID.
    pub id: String,
    /// Its name, without the leading `/`.
    pub name: String,
    /// Its init process (never 0: the container runs).
    pub pid: u32,
    /// Its `MESH_CIDR` / `WEAVE_CIDR`, if set.
    pub cidr: Option<String>,
}

impl DockerContainer {
    /// Its network namespace, as a TARGET the attach manager opens.
    pub fn netns_target(&self) -> String {
        self.pid.to_string()
    }
}

/// Whether TARGET may name a Docker container: not a PID, not a path.
pub fn is_reference(target: &str) -> bool {
    !target.is_empty() && !target.bytes().all(|b| b.is_ascii_digit()) && !target.contains('/')
}

/// The running container `reference` (a name, or a full or short ID) names
/// in the Docker API at `docker_host` (a unix socket). Errors, one line
/// each: unknown to Docker, not running, in another container's or the
/// host's network namespace, or no Docker daemon answering there.
pub async fn resolve(docker_host: &Path, reference: &str) -> Result<DockerContainer, String> {
    let sock = format!("unix://{}", docker_host.display());
    let path = format!("/containers/{}/json", encode(reference));
    let answer = tokio::time::timeout(RESOLVE_TIMEOUT, docker_get(docker_host, &path)).await;
    let v = match answer {
        Err(_) => {
            return Err(format!(
                "no container {reference:?}: not a PID or a network namespace path, and the Docker API at {sock} did not answer within {}s",
                RESOLVE_TIMEOUT.as_secs()
            ))
        }
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Err(describe(reference, &sock, &e)),
    };
    from_inspection(reference, &sock, &v)
}

/// The TARGET of an attach, detach or DNS request when it may name a
/// Docker container (see [`is_reference`]).
pub fn reference_in(req: &Request) -> Option<&str> {
    let target = match req {
        Request::Attach { target, .. } | Request::Detach { target, .. } => Some(target),
        Request::DnsAdd { target, .. } | Request::DnsRemove { target, .. } => target.as_ref(),
        _ => None,
    }?;
    is_reference(target).then_some(target.as_str())
}

/// An attach, detach or DNS request whose TARGET names a Docker container,
/// made into one the attach manager takes (it knows PIDs and paths): the
/// container's PID as TARGET; for an attach, its Docker name as the mesh
/// name unless `--name` gave one, and with no ADDR given, its
/// `MESH_CIDR`/`WEAVE_CIDR` (else `net:default`). A detach or DNS request
/// whose TARGET is one of `attached` (the ids of attached containers) is
/// left as it is: those names come first. Returns the request and the
/// container it resolved to, if any.
pub async fn resolve_request(
    req: Request,
    docker_host: &Path,
    attached: &[String],
) -> Result<(Request, Option<DockerContainer>), String> {
    let Some(reference) = reference_in(&req) else {
        return Ok((req, None));
    };
    let attach = matches!(req, Request::Attach { .. });
    if !attach && attached.iter().any(|id| id == reference) {
        return Ok((req, None));
    }
    let c = match resolve(docker_host, reference).await {
        Ok(c) => c,
        // What the attach manager says of a TARGET it does not know (`mesh
        // run` and the proxy take it for "released already"), and why
        // Docker did not help.
        Err(e) if !attach => {
            return Err(format!("no attached container matches {reference} ({e})"))
        }
        Err(e) => return Err(e),
    };
    let target = c.netns_target();
    let req = match req {
        Request::Attach {
            addrs,
            name,
            ifname,
            hand_over,
            port,
            ..
        } => {
            let addrs = if addrs.is_empty() {
                addr::addrs_or_default(c.cidr.as_deref())
                    .map_err(|e| format!("container {}: MESH_CIDR/WEAVE_CIDR: {e}", c.name))?
            } else {
                addrs
            };
            Request::Attach {
                addrs,
                name: name.or_else(|| Some(c.name.clone())),
                target,
                ifname,
                hand_over,
                port,
            }
        }
        Request::Detach { addrs, .. } => Request::Detach { addrs, target },
        Request::DnsAdd { ips, fqdn, .. } => Request::DnsAdd {
            ips,
            target: Some(target),
            fqdn,
        },
        Request::DnsRemove { ips, fqdn, .. } => Request::DnsRemove {
            ips,
            target: Some(target),
            fqdn,
        },
        other => other,
    };
    Ok((req, Some(c)))
}

/// The attach manager's answer to a request [`resolve_request`] rewrote,
/// naming the container as the user did rather than by its PID.
pub fn reword(message: &str, c: &DockerContainer) -> String {
    match message.strip_prefix("no attached container matches ") {
        Some(pid) if pid == c.netns_target() => format!(
            "no attached container matches {} (Docker container {}, PID {})",
            c.name,
            short(&c.id),
            c.pid
        ),
        _ => message.to_string(),
    }
}

/// One line for a failed inspection.
fn describe(reference: &str, sock: &str, e: &anyhow::Error) -> String {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return format!(
            "no container {reference:?}: not a PID or a network namespace path, and no Docker daemon answers at {sock} ({io}; see --docker-host)"
        );
    }
    let text = format!("{e:#}");
    if text.starts_with("status 404") {
        return format!(
            "no container {reference:?}: not a PID, a network namespace path, or a container known to Docker at {sock}"
        );
    }
    let text = text.lines().next().unwrap_or_default();
    format!("no container {reference:?}: the Docker API at {sock} answered {text}")
}

/// The container in an inspection (`GET /containers/{id}/json`), if it
/// runs in a network namespace of its own.
fn from_inspection(
    reference: &str,
    sock: &str,
    v: &serde_json::Value,
) -> Result<DockerContainer, String> {
    let bad = || {
        format!("container {reference:?}: the Docker API at {sock} answered an inspection without its name or ID")
    };
    let c = Inspected::from_json(v).ok_or_else(bad)?;
    let id = v
        .get("Id")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(bad)?
        .to_string();
    if !c.running || c.pid == 0 {
        return Err(format!(
            "container {} ({}) is not running: start it first",
            c.name,
            short(&id)
        ));
    }
    if c.shared_netns {
        return Err(format!(
            "container {} ({}) uses the network namespace of the host or of another container: attach that one",
            c.name,
            short(&id)
        ));
    }
    Ok(DockerContainer {
        id,
        name: c.name,
        pid: c.pid,
        cidr: c.cidr,
    })
}

/// An ID as `docker ps` shows it.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn which_targets_may_be_docker_containers() {
        assert!(is_reference("app"));
        assert!(is_reference("3f2a9c"));
        assert!(is_reference("my_proj-web.1"));
        assert!(!is_reference("1234"));
        assert!(!is_reference("/run/netns/c1"));
        assert!(!is_reference("/proc/1/ns/net"));
        assert!(!is_reference(""));
    }

    #[test]
    fn reads_inspections() {
        let sock = "unix:///d.sock";
        let v = json!({
            "Id": "0123456789abcdef0123",
            "Name": "/app",
            "State": {"Running": true, "Pid": 42},
            "Config": {"Env": ["PATH=/bin", "WEAVE_CIDR=net:198.19.3.0/24"]},
            "HostConfig": {"NetworkMode": "none"}
        });
        let c = from_inspection("app", sock, &v).expect("running");
        assert_eq!(
            c,
            DockerContainer {
                id: "0123456789abcdef0123".into(),
                name: "app".into(),
                pid: 42,
                cidr: Some("net:198.19.3.0/24".into()),
            }
        );
        assert_eq!(c.netns_target(), "42");

        let stopped = json!({"Id": "0123456789abcdef0123", "Name": "/app",
            "State": {"Running": false, "Pid": 0}});
        let e = from_inspection("app", sock, &stopped).expect_err("stopped");
        assert_eq!(
            e,
            "container app (0123456789ab) is not running: start it first"
        );

        let shared = json!({"Id": "ab", "Name": "/h", "State": {"Running": true, "Pid": 7},
            "HostConfig": {"NetworkMode": "host"}});
        assert!(from_inspection("h", sock, &shared)
            .expect_err("host network")
            .contains("network namespace of the host"));

        let nameless = json!({"Id": "ab", "State": {"Running": true, "Pid": 7}});
        assert!(from_inspection("x", sock, &nameless).is_err());
        let idless = json!({"Name": "/x", "State": {"Running": true, "Pid": 7}});
        assert!(from_inspection("x", sock, &idless).is_err());
    }

    #[tokio::test]
    async fn no_docker_daemon_is_one_line_naming_the_socket() {
        let dir = std::env::temp_dir().join(format!("mesh-docker-{}", std::process::id()));
        let sock = dir.join("nothing.sock");
        let e = resolve(&sock, "app").await.expect_err("no daemon");
        assert!(
            e.contains(&format!("unix://{}", sock.display())) && !e.contains('\n'),
            "{e}"
        );
        assert!(e.contains("no Docker daemon answers"), "{e}");
    }

    #[tokio::test]
    async fn pids_paths_and_attached_names_are_not_asked_of_docker() {
        let nowhere = Path::new("/nonexistent/docker.sock");
        let detach = |t: &str| Request::Detach {
            addrs: Vec::new(),
            target: t.into(),
        };
        for req in [detach("1234"), detach("/run/netns/x")] {
            let (_, c) = resolve_request(req, nowhere, &[]).await.expect("as is");
            assert_eq!(c, None);
        }
        let (req, c) = resolve_request(detach("web"), nowhere, &["web".into()])
            .await
            .expect("an attached name");
        assert_eq!(c, None);
        assert!(matches!(req, Request::Detach { target, .. } if target == "web"));
        let dns = Request::DnsAdd {
            ips: Vec::new(),
            target: None,
            fqdn: Some("x.mesh.local".into()),
        };
        assert!(resolve_request(dns, nowhere, &[]).await.is_ok());
        // Not attached and no Docker: one line naming the socket.
        let e = resolve_request(detach("web"), nowhere, &[])
            .await
            .expect_err("no Docker");
        assert!(
            e.starts_with("no attached container matches web (")
                && e.contains("unix:///nonexistent/docker.sock"),
            "{e}"
        );
    }

    #[test]
    fn rewords_the_managers_not_found() {
        let c = DockerContainer {
            id: "0123456789abcdef".into(),
            name: "app".into(),
            pid: 42,
            cidr: None,
        };
        assert_eq!(
            reword("no attached container matches 42", &c),
            "no attached container matches app (Docker container 0123456789ab, PID 42)"
        );
        assert_eq!(reword("something else", &c), "something else");
    }

    #[test]
    fn a_404_is_an_unknown_container() {
        let e = anyhow::anyhow!("status 404: {{\"message\":\"No such container: foo\"}}");
        assert_eq!(
            describe("foo", "unix:///d.sock", &e),
            "no container \"foo\": not a PID, a network namespace path, or a container known to Docker at unix:///d.sock"
        );
    }
}
