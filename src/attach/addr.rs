//! ADDR forms of the command line and of `WEAVE_CIDR`/`MESH_CIDR`:
//! `ip:CIDR` or a bare `CIDR` claim that address; `net:CIDR` and
//! `net:default` ask the allocator for one (not available yet: IPAM comes
//! with its own issue); `none` means do not attach.

use ipnet::IpNet;
use std::fmt;

/// One parsed ADDR.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Addr {
    /// Claim this address (host address with the subnet's prefix).
    Ip(IpNet),
    /// Allocate in this subnet.
    Net(IpNet),
    /// Allocate in the default subnet.
    NetDefault,
    /// Do not attach.
    None,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Ip(n) => write!(f, "ip:{n}"),
            Addr::Net(n) => write!(f, "net:{n}"),
            Addr::NetDefault => write!(f, "net:default"),
            Addr::None => write!(f, "none"),
        }
    }
}

fn cidr(s: &str, whole: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>().map_err(|_| {
        format!(
            "invalid address {whole:?}: expected a CIDR like 198.19.1.5/24 (address/prefix-length)"
        )
    })
}

/// Parse one ADDR.
pub fn parse(s: &str) -> Result<Addr, String> {
    let s = s.trim();
    if s == "none" {
        return Ok(Addr::None);
    }
    if s == "net:default" {
        return Ok(Addr::NetDefault);
    }
    if let Some(rest) = s.strip_prefix("net:") {
        let n = cidr(rest, s)?;
        if n.trunc() != n {
            return Err(format!(
                "invalid subnet {s:?}: host bits are set; did you mean net:{}?",
                n.trunc()
            ));
        }
        return Ok(Addr::Net(n));
    }
    let rest = s.strip_prefix("ip:").unwrap_or(s);
    let n = cidr(rest, s)?;
    if n.prefix_len() < n.max_prefix_len()
        && (n.addr() == n.network() || n.addr() == n.broadcast())
        && n.addr().is_ipv4()
    {
        return Err(format!(
            "invalid address {s:?}: {} is the {} address of {}",
            n.addr(),
            if n.addr() == n.network() {
                "network"
            } else {
                "broadcast"
            },
            n.trunc()
        ));
    }
    Ok(Addr::Ip(n))
}

/// Parse a space-separated list (as in `WEAVE_CIDR`).
pub fn parse_list(s: &str) -> Result<Vec<Addr>, String> {
    s.split_whitespace().map(parse).collect()
}

/// A space-separated ADDR list (`WEAVE_CIDR`'s value, if any) as the
/// strings an attach request carries; `net:default` when the list is
/// absent or empty. `["none"]` (or all `none`) means: do not attach.
pub fn addrs_or_default(list: Option<&str>) -> Result<Vec<String>, String> {
    let addrs: Vec<String> = parse_list(list.unwrap_or(""))?
        .iter()
        .map(Addr::to_string)
        .collect();
    if addrs.is_empty() {
        return Ok(vec![Addr::NetDefault.to_string()]);
    }
    Ok(addrs)
}

/// Whether an attach with `addrs` attaches nothing (every one is `none`).
pub fn all_none(addrs: &[String]) -> bool {
    addrs.iter().all(|a| a == "none")
}

/// ADDRs from a process environment (`MESH_CIDR` wins over `WEAVE_CIDR`),
/// given as NUL-separated `K=V` (the layout of `/proc/PID/environ`).
pub fn from_environ(environ: &[u8]) -> Option<String> {
    let mut weave = None;
    let mut mesh = None;
    for kv in environ.split(|&b| b == 0) {
        let kv = String::from_utf8_lossy(kv);
        if let Some(v) = kv.strip_prefix("MESH_CIDR=") {
            mesh = Some(v.to_string());
        } else if let Some(v) = kv.strip_prefix("WEAVE_CIDR=") {
            weave = Some(v.to_string());
        }
    }
    mesh.or(weave)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(
            parse("ip:198.19.1.5/24"),
            Ok(Addr::Ip("198.19.1.5/24".parse().unwrap()))
        );
        assert_eq!(
            parse("198.19.1.5/24"),
            Ok(Addr::Ip("198.19.1.5/24".parse().unwrap()))
        );
        assert_eq!(
            parse("net:198.19.2.0/24"),
            Ok(Addr::Net("198.19.2.0/24".parse().unwrap()))
        );
        assert_eq!(parse("net:default"), Ok(Addr::NetDefault));
        assert_eq!(parse("none"), Ok(Addr::None));
        assert_eq!(
            parse("ip:10.32.0.1/12"),
            Ok(Addr::Ip("10.32.0.1/12".parse().unwrap()))
        );
    }

    #[test]
    fn errors() {
        for bad in [
            "ip:300.1.2.3/24",
            "ip:198.19.1.1/99",
            "ip:198.19.1.1",
            "net:198.19.2.5/24",
            "bogus",
            "ip:198.19.1.0/24",
            "ip:198.19.1.255/24",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn environ() {
        assert_eq!(
            from_environ(b"A=1\0WEAVE_CIDR=net:198.19.2.0/24\0"),
            Some("net:198.19.2.0/24".into())
        );
        assert_eq!(
            from_environ(b"MESH_CIDR=none\0WEAVE_CIDR=x\0"),
            Some("none".into())
        );
        assert_eq!(from_environ(b"A=1\0"), None);
    }
}
