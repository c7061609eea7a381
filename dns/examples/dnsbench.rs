//! A mesh-dns server for benchmarks: `N` names `c0..c{N-1}.mesh.local.`
//! (198.18.x.y), on a current-thread runtime (one core), no upstreams.
//!
//! `dnsbench [--port P] [--names N] [--hosts FILE]`: serves UDP and TCP on
//! 127.0.0.1:P; with `--hosts` it also writes the same names as a hosts
//! file (for dnsmasq's `--addn-hosts`) and exits.

use mesh_dns::{serve, Config, Zone};
use std::net::Ipv4Addr;
use std::sync::Arc;

fn addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 100 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut port = 5300u16;
    let mut names = 1000u32;
    let mut hosts = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next().ok_or("--port needs a value")?.parse()?,
            "--names" => names = args.next().ok_or("--names needs a value")?.parse()?,
            "--hosts" => hosts = Some(args.next().ok_or("--hosts needs a file")?),
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    if let Some(path) = hosts {
        let text: String = (0..names)
            .map(|i| format!("{} c{i}.mesh.local\n", addr(i)))
            .collect();
        std::fs::write(path, text)?;
        return Ok(());
    }
    let zone = Arc::new(Zone::new(Config {
        resolv_conf: "/nonexistent/resolv.conf".into(),
        ..Config::default()
    })?);
    zone.set_names((0..names).map(|i| (format!("c{i}"), addr(i))));
    let udp = std::net::UdpSocket::bind(("127.0.0.1", port))?;
    let tcp = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(udp, tcp, zone))?;
    Ok(())
}
