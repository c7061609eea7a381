//! Test scaffolding: namespaces with a run-unique prefix removed on drop,
//! a "host" thread running tokio inside a test namespace, bounded polls.
//!
//! Interfaces are created only inside namespaces a test owns, so their
//! names need not be unique; namespace names carry `mh<pid>x<n>`.

use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True if running as root; otherwise prints a loud skip notice.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        eprintln!("SKIPPED: needs root (host plumbing tests create kernel objects)");
        false
    }
}

/// A set of network namespaces owned by one test; all removed on drop
/// (which also removes every link inside them).
pub struct TestNet {
    prefix: String,
    names: std::sync::Mutex<Vec<String>>,
}

impl TestNet {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        TestNet {
            prefix: format!("mh{}x{}", std::process::id(), n),
            names: Default::default(),
        }
    }

    /// Create namespace `<prefix><suffix>` and return its name.
    pub fn add_ns(&self, suffix: &str) -> String {
        let name = format!("{}{}", self.prefix, suffix);
        run(&["ip", "netns", "add", &name]);
        self.names.lock().unwrap().push(name.clone());
        name
    }

    pub fn ns_path(&self, name: &str) -> String {
        format!("/run/netns/{name}")
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for name in self.names.lock().unwrap().drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Run a command, panic with its output if it fails.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command inside namespace `ns`; true if it exited 0.
pub fn ns_ok(ns: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Run a command inside namespace `ns`, panic if it fails.
pub fn ns_run(ns: &str, args: &[&str]) -> String {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full)
}

/// Poll `cond` until it is true or `limit` passes; returns the last result.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Run an async test body on a thread that has joined namespace `ns`, with
/// a current-thread tokio runtime. Panics in the body propagate.
pub fn on_host<F, Fut, T>(ns: &str, body: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let handle = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(body())
    });
    match handle.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}
