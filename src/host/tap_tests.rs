//! TAP test: a container behind the bridge pings an address nobody has;
//! the ARP request comes out of the TAP, a forged ARP reply and ICMP echo
//! reply written into the TAP make the ping succeed (root only).

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::host::testutil::{on_host, require_root, wait_until, TestNet};
use crate::host::{attach_veth, Netlink};

const GHOST_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 9, 9);
const GHOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x99, 0x09];
const C1_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 9, 1);

/// Kills the ping child by its PID if the test fails early.
struct ChildGuard(Child);
impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Read frames until `pick` accepts one (bounded); returns the frame
/// without the vnet header.
async fn read_until(
    dev: &tun_rs::AsyncDevice,
    limit: Duration,
    pick: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; VNET_HDR_LEN + 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "expected frame not seen on the TAP");
        let Ok(n) = tokio::time::timeout(left, dev.recv(&mut buf)).await else {
            continue;
        };
        let n = n.unwrap();
        assert!(n >= VNET_HDR_LEN + 14, "short read {n}");
        let frame = &buf[VNET_HDR_LEN..n];
        if pick(frame) {
            return frame.to_vec();
        }
    }
}

fn is_arp_request_for(frame: &[u8], ip: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 1]
        && frame[38..42] == ip.octets()
}

fn is_echo_request_to(frame: &[u8], ip: Ipv4Addr) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 1
        && frame[30..34] == ip.octets()
        && frame[14 + usize::from(frame[14] & 0x0f) * 4] == 8
}

fn arp_reply(to_mac: [u8; 6], to_ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(VNET_HDR_LEN + 42);
    f.extend_from_slice(&[0u8; VNET_HDR_LEN]);
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&GHOST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 2]);
    f.extend_from_slice(&GHOST_MAC);
    f.extend_from_slice(&GHOST_IP.octets());
    f.extend_from_slice(&to_mac);
    f.extend_from_slice(&to_ip.octets());
    f
}

fn echo_reply(request: &[u8]) -> Vec<u8> {
    let mut f = request.to_vec();
    let (dst, src) = (f[0..6].to_vec(), f[6..12].to_vec());
    f[0..6].copy_from_slice(&src);
    f[6..12].copy_from_slice(&dst);
    let ihl = usize::from(f[14] & 0x0f) * 4;
    let (s, d) = (f[26..30].to_vec(), f[30..34].to_vec());
    f[26..30].copy_from_slice(&d);
    f[30..34].copy_from_slice(&s); // swapping keeps the IP checksum valid
    let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
    let icmp = 14 + ihl;
    f[icmp] = 0; // echo reply
    f[icmp + 2..icmp + 4].copy_from_slice(&[0, 0]);
    let c = checksum(&f[icmp..14 + total]);
    f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    let mut out = vec![0u8; VNET_HDR_LEN];
    out.extend_from_slice(&f[..14 + total]);
    out
}

// Long for a reason: one test that tells one story, step by step, on
// real kernel objects; split, its steps would lose their order.
#[test]
fn tap_sees_arp_and_can_answer() {
    if !require_root() {
        return;
    }
    let tn = TestNet::new();
    let host = tn.add_ns("h");
    let c1 = tn.add_ns("c1");
    let p1 = tn.ns_path(&c1);
    on_host(&host, move || async move {
        let nl = Netlink::current().await.unwrap();
        nl.ensure_bridge("meshbr", 1500).await.unwrap();
        // A leftover of the same name is replaced.
        nl.handle()
            .link()
            .add(rtnetlink::LinkVeth::new("meshtap", "meshtapp").build())
            .execute()
            .await
            .unwrap();
        let mut tap = open_tap(&nl, "meshtap", "meshbr", 1500, 1).await.unwrap();
        assert!(tap.vnet_hdr);
        let dev = tun_rs::AsyncDevice::new(tap.queues.pop().unwrap()).unwrap();
        assert_eq!(tap.mac, nl.link_mac("meshtap").await.unwrap());
        let f1 = std::fs::File::open(&p1).unwrap();
        let cif = attach_veth(
            &nl,
            &f1,
            "meshbr",
            "vethmt1",
            "ethmesh",
            &["198.19.9.1/24".parse().unwrap()],
            1500,
        )
        .await
        .unwrap();

        let mut ping = ChildGuard(
            Command::new("ip")
                .args(["netns", "exec", &c1, "ping", "-c1", "-W10", "198.19.9.9"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Read: the ARP request for the ghost address.
        let arp = read_until(&dev, Duration::from_secs(10), |f| {
            is_arp_request_for(f, GHOST_IP)
        })
        .await;
        assert_eq!(arp[6..12], cif.mac, "ARP request from the container's MAC");
        assert_eq!(arp[0..6], [0xff; 6]);

        // Write: a forged ARP reply, then answer the echo request.
        let n = dev.send(&arp_reply(cif.mac, C1_IP)).await.unwrap();
        assert_eq!(n, VNET_HDR_LEN + 42);
        let req = read_until(&dev, Duration::from_secs(10), |f| {
            is_echo_request_to(f, GHOST_IP)
        })
        .await;
        assert_eq!(req[0..6], GHOST_MAC);
        dev.send(&echo_reply(&req)).await.unwrap();

        let mut status = None;
        assert!(
            wait_until(Duration::from_secs(15), || {
                status = ping.0.try_wait().unwrap();
                status.is_some()
            }),
            "ping did not finish"
        );
        assert!(
            status.unwrap().success(),
            "ping got no reply through the TAP"
        );

        // Dropping the device removes the TAP (the kernel does so once the
        // last reference to the file is gone, which may take a moment).
        drop(dev);
        drop(tap);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while nl.link_index("meshtap").await.unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the TAP outlived its device by 10 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}
