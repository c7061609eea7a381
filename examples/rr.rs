//! A TCP request/response latency probe (what `netperf TCP_RR` measures):
//! a client sends a small request, waits for the whole response, and does
//! it again, on one connection with Nagle off; the figure is the time of
//! one exchange, which is a round trip through the path plus the two
//! programs' turnaround.
//!
//! ```text
//! rr server ADDR:PORT                       # answers every client, forever
//! rr client ADDR:PORT [COUNT] [SIZE]        # COUNT exchanges of SIZE bytes
//! ```
//!
//! The client prints one line: `rr_us p50=… avg=… p99=… n=COUNT size=SIZE`
//! (microseconds; the first ten exchanges are not counted, they warm the
//! path). Used by `benches/datapath.sh`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Instant;

fn usage() -> ExitCode {
    eprintln!("usage: rr server ADDR:PORT | rr client ADDR:PORT [COUNT] [SIZE]");
    ExitCode::from(2)
}

/// Echo what arrives, in the sizes it arrives in, until the peer closes.
fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn server(addr: &str) -> ExitCode {
    let l = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rr: listening on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for s in l.incoming().flatten() {
        std::thread::spawn(move || echo(s));
    }
    ExitCode::SUCCESS
}

fn client(addr: &str, count: usize, size: usize) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    let warm = 10;
    let mut us = Vec::with_capacity(count);
    for i in 0..count + warm {
        let t = Instant::now();
        s.write_all(&req).map_err(|e| format!("sending: {e}"))?;
        s.read_exact(&mut resp)
            .map_err(|e| format!("receiving: {e}"))?;
        if i >= warm {
            us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1];
    let avg = us.iter().sum::<f64>() / us.len() as f64;
    Ok(format!(
        "rr_us p50={:.0} avg={avg:.0} p99={:.0} n={count} size={size}",
        at(0.5),
        at(0.99)
    ))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", addr] => server(addr),
        ["client", addr, rest @ ..] if rest.len() <= 2 => {
            let count = rest.first().map_or(Ok(1000), |c| c.parse());
            let size = rest.get(1).map_or(Ok(1), |c| c.parse());
            match (count, size) {
                (Ok(c), Ok(s)) if c > 0 && s > 0 => match client(addr, c, s) {
                    Ok(line) => {
                        println!("{line}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("rr: {e}");
                        ExitCode::FAILURE
                    }
                },
                _ => usage(),
            }
        }
        _ => usage(),
    }
}
