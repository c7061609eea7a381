//! The world: one test's underlay, its hosts and containers, and the clean-up.

use super::capture::*;
use super::consts::*;
use super::hosts::*;
use super::impair::*;
use super::process::*;

// ---------------------------------------------------------------------------
// The world

/// One test's private network; cleans up everything when dropped.
pub struct World {
    /// The test's name, for messages.
    pub test: String,
    /// Prefix of every namespace and temp dir of this run.
    pub prefix: String,
    /// The run's temp dir.
    pub dir: PathBuf,
    switch_ns: String,
    hosts: Vec<Host>,
    containers: Vec<Container>,
    daemon_pids: RefCell<Vec<i32>>,
    /// Relays of impaired hosts, by host name; stopped before the
    /// namespaces go.
    relays: Vec<(String, Relay)>,
}

impl World {
    /// A new, empty underlay for `test`; `None` (after saying so loudly) when
    /// not running as root.
    pub fn new(test: &str) -> Option<World> {
        if !is_root() {
            eprintln!("\n*** SKIPPED (needs root): {test} ***\n");
            return None;
        }
        let r = random_bytes(3);
        let prefix = format!("mt{:02x}{:02x}{:02x}", r[0], r[1], r[2]);
        let dir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&dir).expect("create test dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod test dir");
        eprintln!("{test}: namespaces and files prefixed {prefix}");
        let switch_ns = format!("{prefix}-sw");
        let world = World {
            test: test.to_string(),
            prefix,
            dir,
            switch_ns: switch_ns.clone(),
            hosts: Vec::new(),
            containers: Vec::new(),
            daemon_pids: RefCell::new(Vec::new()),
            relays: Vec::new(),
        };
        // From here on, the guard cleans up whatever was made.
        netns_add(&switch_ns);
        ip(&["-n", &switch_ns, "link", "set", "lo", "up"]);
        ip(&["-n", &switch_ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch_ns, "link", "set", "br0", "up"]);
        Some(world)
    }

    /// Adds host `hN` at `198.18.0.N/24`, joined to the switch.
    pub fn add_host(&mut self) -> Host {
        let host = self.new_host();
        ip(&[
            "-n",
            &self.switch_ns,
            "link",
            "set",
            &host.name,
            "master",
            "br0",
        ]);
        host
    }

    /// Adds host `hN` at `198.18.0.N/24`, joined to the switch through an
    /// impairment relay (see `impair.rs`): its switch-side end `hN` stays
    /// out of the bridge, a veth pair `rN`/`bN` joins the relay to it, and
    /// the relay applies `imp` to every frame from the host.
    /// [`World::relay`] finds the relay (to cut the host off).
    #[track_caller]
    pub fn add_impaired_host(&mut self, imp: &Impairment) -> Host {
        let host = self.new_host();
        let n = &host.name[1..];
        let (r, b) = (format!("r{n}"), format!("b{n}"));
        let sw = self.switch_ns.clone();
        ip(&[
            "-n", &sw, "link", "add", &r, "type", "veth", "peer", "name", &b,
        ]);
        ip(&["-n", &sw, "link", "set", &b, "master", "br0", "up"]);
        ip(&["-n", &sw, "link", "set", &r, "up"]);
        // The relay moves frames, not offload metadata: whole, checksummed
        // frames only.
        for (ns, dev) in [(&host.ns, "eth0"), (&sw, &host.name), (&sw, &r), (&sw, &b)] {
            run_ok(
                "ip",
                &[
                    "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "tso", "off", "gso",
                    "off", "gro", "off",
                ],
            );
        }
        let relay = Relay::start(&sw, &host.name, &r, *imp);
        self.relays.push((host.name.clone(), relay));
        host
    }

    /// The relay of impaired host `host`.
    #[track_caller]
    pub fn relay(&self, host: &Host) -> &Relay {
        self.relays
            .iter()
            .find(|(n, _)| *n == host.name)
            .map(|(_, r)| r)
            .unwrap_or_else(|| panic!("{} has no relay", host.name))
    }

    /// Host `hN`'s namespace, dirs and veth pair (`hN` up in the switch,
    /// not yet joined to anything; `eth0` up at `198.18.0.N/24`).
    fn new_host(&mut self) -> Host {
        let n = self.hosts.len() + 1;
        assert!(n < 255, "too many hosts");
        let name = format!("h{n}");
        let ns = format!("{}-{name}", self.prefix);
        let host_dir = self.dir.join(&name);
        let run_dir = host_dir.join("run");
        let data_dir = host_dir.join("data");
        fs::create_dir_all(&run_dir).expect("create run dir");
        fs::create_dir_all(&data_dir).expect("create data dir");
        let host = Host {
            name: name.clone(),
            ns: ns.clone(),
            ip: Ipv4Addr::new(198, 18, 0, n as u8),
            plugin_dir: run_dir.join("plugins"),
            run_dir,
            data_dir,
            underlay_if: "eth0".to_string(),
        };
        netns_add(&ns);
        self.hosts.push(host.clone());
        let sw = self.switch_ns.as_str();
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // Both ends are created directly inside their namespaces, so no name
        // ever appears in the root namespace.
        ip(&[
            "-n", sw, "link", "add", &name, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip(&["-n", sw, "link", "set", &name, "up"]);
        let cidr = format!("{}/24", host.ip);
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        host
    }

    /// Bytes every host has sent on the underlay so far: the sum of what
    /// the switch's ports received (each byte counted once).
    #[track_caller]
    pub fn underlay_bytes(&self) -> u64 {
        let out = run_ok(
            "ip",
            &[
                "-n",
                &self.switch_ns,
                "-s",
                "-j",
                "link",
                "show",
                "master",
                "br0",
            ],
        );
        let ports: serde_json::Value = serde_json::from_str(&out).expect("ip -j link is JSON");
        ports
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p["stats64"]["rx"]["bytes"].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Adds an empty container namespace `<prefix>-<name>` (loopback up).
    pub fn add_container(&mut self, name: &str) -> Container {
        let ns = format!("{}-{name}", self.prefix);
        let c = Container {
            name: name.to_string(),
            path: format!("/run/netns/{ns}"),
            ns: ns.clone(),
        };
        netns_add(&ns);
        self.containers.push(c.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        c
    }

    /// A namespace path under this run's prefix that does not exist.
    pub fn missing_netns_path(&self) -> String {
        format!("/run/netns/{}-does-not-exist", self.prefix)
    }

    /// `mesh launch ARGS...` on `host`, whatever the outcome; the daemon's PID
    /// (if it wrote one) is remembered for clean-up.
    #[track_caller]
    pub fn try_launch(&self, host: &Host, args: &[&str]) -> Output {
        let mut all = vec!["launch"];
        all.extend_from_slice(args);
        let out = try_run(&mut host.command(MESH, &all), LAUNCH_TIMEOUT);
        if let Some(pid) = host.daemon_pid() {
            self.daemon_pids.borrow_mut().push(pid);
        }
        out.unwrap_or_else(|e| panic!("mesh launch on {}: {e}", host.name))
    }

    /// `mesh launch ARGS...` on `host`, which must succeed; returns the peer
    /// name it printed.
    #[track_caller]
    pub fn launch(&self, host: &Host, args: &[&str]) -> String {
        let out = self.try_launch(host, args);
        assert!(
            out.status.success(),
            "mesh launch {} on {} failed: {}",
            args.join(" "),
            host.name,
            show(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let name = stdout
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string();
        assert!(
            is_mac(&name),
            "mesh launch on {} printed {stdout:?}, not a peer name xx:xx:xx:xx:xx:xx",
            host.name
        );
        let pid = host
            .daemon_pid()
            .unwrap_or_else(|| panic!("no mesh.pid in {} after launch", host.run_dir.display()));
        assert!(
            pid_alive(pid),
            "daemon {pid} of {} is not running",
            host.name
        );
        name
    }

    /// `mesh attach ip:CIDR --name <c.name> <c.path>` on `host`, which must
    /// succeed and print `cidr` on a line of its own.
    #[track_caller]
    pub fn attach(&self, host: &Host, c: &Container, cidr: &str) {
        let addr = format!("ip:{cidr}");
        let out = host.mesh(&["attach", &addr, "--name", &c.name, &c.path]);
        assert!(
            out.status.success(),
            "attach {cidr} to {} on {}: {}",
            c.name,
            host.name,
            show(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.lines().any(|l| l.trim() == cidr),
            "attach printed {stdout:?}, no line {cidr:?}"
        );
    }

    /// `mesh attach net:SUBNET --name <c.name> <c.path>` on `host`, which
    /// must succeed with an address in `subnet`; returns the address (no
    /// prefix length). An allocated address, unlike a fixed one, need not
    /// lie in `host`'s own part of the range.
    #[track_caller]
    pub fn attach_net(&self, host: &Host, c: &Container, subnet: &str) -> String {
        let net: ipnet::Ipv4Net = subnet.parse().expect("a subnet");
        let addr = format!("net:{subnet}");
        let out = host.mesh_ok(&["attach", &addr, "--name", &c.name, &c.path]);
        let ip = first_addr(&out);
        assert!(
            ip.parse::<Ipv4Addr>().is_ok_and(|a| net.contains(&a)),
            "attach {addr} to {} on {} printed {out:?}",
            c.name,
            host.name
        );
        ip
    }

    /// Hosts `h1` and `h2`, launched with `args` (h2 naming h1).
    #[track_caller]
    pub fn launch_pair(&mut self, args: &[&str]) -> (Host, Host) {
        let h1 = self.add_host();
        let h2 = self.add_host();
        self.launch(&h1, args);
        let mut a = args.to_vec();
        a.push("198.18.0.1");
        self.launch(&h2, &a);
        (h1, h2)
    }

    /// A chain h1 — h2 — h3: h1 and h3 cut off from each other on the
    /// underlay, all launched with `args` via h2, and containers `c1`
    /// (198.19.1.1/24 on h1) and `c3` (198.19.1.3/24 on h3), so that
    /// everything between them is relayed by h2.
    #[track_caller]
    pub fn relay_chain(&mut self, args: &[&str]) -> ([Host; 3], Container, Container) {
        let h1 = self.add_host();
        let h2 = self.add_host();
        let h3 = self.add_host();
        let c1 = self.add_container("c1");
        let c3 = self.add_container("c3");
        self.partition(&h1, &[h3.ip]);
        self.launch(&h2, args);
        for h in [&h1, &h3] {
            let mut a = args.to_vec();
            a.push("198.18.0.2");
            self.launch(h, &a);
        }
        self.attach(&h1, &c1, "198.19.1.1/24");
        self.attach(&h3, &c3, "198.19.1.3/24");
        ([h1, h2, h3], c1, c3)
    }

    /// Containers named and attached as listed: `(host, name, cidr)`.
    #[track_caller]
    pub fn attach_new(&mut self, list: &[(&Host, &str, &str)]) -> Vec<Container> {
        list.iter()
            .map(|(h, name, cidr)| {
                let c = self.add_container(name);
                self.attach(h, &c, cidr);
                c
            })
            .collect()
    }

    /// `n` hosts `h1..hn`, each with one container `c1..cn` (neither
    /// launched nor attached).
    pub fn add_hosts_with_containers(&mut self, n: usize) -> (Vec<Host>, Vec<Container>) {
        let hosts = (0..n).map(|_| self.add_host()).collect();
        let containers = (1..=n)
            .map(|i| self.add_container(&format!("c{i}")))
            .collect();
        (hosts, containers)
    }

    /// Attaches container `i` to host `i` at `198.19.1.<i+1>/24`; returns
    /// the container addresses (without prefix), in order.
    #[track_caller]
    pub fn attach_each(&self, hosts: &[Host], containers: &[Container]) -> Vec<String> {
        hosts
            .iter()
            .zip(containers)
            .enumerate()
            .map(|(i, (h, c))| {
                let ip = format!("198.19.1.{}", i + 1);
                self.attach(h, c, &format!("{ip}/24"));
                ip
            })
            .collect()
    }

    /// Starts capturing everything on `host`'s underlay interface.
    #[track_caller]
    pub fn capture(&self, host: &Host) -> Capture {
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.join(format!("{}-{n}.pcap", host.name));
        let errfile = self.dir.join(format!("{}-{n}.tcpdump.err", host.name));
        let err = File::create(&errfile).expect("create tcpdump log");
        let file_s = file.to_string_lossy().into_owned();
        // -Z root: keep root so tcpdump can write into our root-owned dir;
        // --immediate-mode and -U: hand over and write each packet at once.
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &host.ns,
                "tcpdump",
                "-Z",
                "root",
                "--immediate-mode",
                "-n",
                "-i",
            ])
            .arg(&host.underlay_if)
            .args(["-s", "0", "-U", "-w", &file_s])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn tcpdump (is it installed? scripts/test.sh installs it)");
        let mut cap = Capture {
            child: Some(child),
            ns: host.ns.clone(),
            broadcast: Ipv4Addr::new(198, 18, 0, 255),
            file,
            errfile,
        };
        // tcpdump says "listening on ..." once the capture is open.
        wait_for(Duration::from_secs(15), "tcpdump listens", || {
            let log = fs::read_to_string(&cap.errfile).unwrap_or_default();
            if log.contains("listening on") {
                return Ok(());
            }
            match cap.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => panic!("tcpdump exited ({status}): {log}"),
                _ => Err(log),
            }
        });
        cap
    }

    /// Cuts `host`'s underlay off from the hosts at `others` (nftables drop
    /// rules in its namespace, both directions); [`World::heal`] undoes it.
    #[track_caller]
    pub fn partition(&self, host: &Host, others: &[Ipv4Addr]) {
        let set = others
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet meshtest {{
                chain in {{ type filter hook input priority 0; ip saddr {{ {set} }} drop; }}
                chain out {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; }}
            }}"
        );
        let n = SCRATCH.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{n}.nft", host.name));
        fs::write(&path, rules).expect("write nft rules");
        let out = run(
            &mut host.command("nft", &["-f", &path.to_string_lossy()]),
            CMD_TIMEOUT,
        );
        assert!(out.status.success(), "nft on {}: {}", host.name, show(&out));
    }

    /// Removes the rules of [`World::partition`] from `host`.
    #[track_caller]
    pub fn heal(&self, host: &Host) {
        let out = run(
            &mut host.command("nft", &["delete", "table", "inet", "meshtest"]),
            CMD_TIMEOUT,
        );
        assert!(out.status.success(), "nft on {}: {}", host.name, show(&out));
    }

    /// Every host made so far.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }
}

impl Drop for World {
    fn drop(&mut self) {
        // Nothing in here may panic: a panic while unwinding aborts the run.
        if std::thread::panicking() {
            eprintln!("===== {} FAILED; state of its hosts =====", self.test);
            for h in &self.hosts {
                let status = match h.daemon_pid() {
                    Some(pid) if pid_alive(pid) => {
                        let mut text = String::new();
                        for args in [
                            &["status"][..],
                            &["status", "peers"][..],
                            &["status", "ipam"][..],
                        ] {
                            match try_run(&mut h.command(MESH, args), Duration::from_secs(5)) {
                                Ok(out) => text.push_str(&show(&out)),
                                Err(e) => text.push_str(&e),
                            }
                        }
                        text
                    }
                    _ => "(daemon not running)".to_string(),
                };
                eprintln!("----- {} ({}) mesh status -----\n{status}", h.name, h.ns);
                eprintln!(
                    "----- {} mesh.log (last {LOG_TAIL_LINES} lines) -----\n{}",
                    h.name,
                    h.log_tail(LOG_TAIL_LINES)
                );
            }
            eprintln!("===== end of {} =====", self.test);
        }
        // The relays' threads stop (and print their counters) first.
        self.relays.clear();
        let mut pids = self.daemon_pids.borrow().clone();
        pids.extend(self.hosts.iter().filter_map(Host::daemon_pid));
        pids.sort_unstable();
        pids.dedup();
        for pid in pids {
            if is_mesh_process(pid) {
                terminate(pid);
            }
        }
        let namespaces = self
            .containers
            .iter()
            .map(|c| c.ns.clone())
            .chain(self.hosts.iter().map(|h| h.ns.clone()))
            .chain(std::iter::once(self.switch_ns.clone()));
        for ns in namespaces {
            match try_run(
                Command::new("ip").args(["netns", "del", &ns]),
                Duration::from_secs(10),
            ) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!("cleanup: ip netns del {ns}: {}", show(&out)),
                Err(e) => eprintln!("cleanup: {e}"),
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: rm -r {}: {e}", self.dir.display());
        }
    }
}
