//! The fuzz targets' findings, kept: every file under
//! `fuzz/regressions/<target>/` (crashes, timeouts and slow inputs that
//! `fuzz/run.sh` copied there, and hand-made nasty inputs) goes through the
//! same driver as the fuzz target (`fuzz/src/lib.rs`, included here), on
//! stable Rust, with the normal `cargo test`. A driver that panics fails
//! the test and names the file. No root needed.

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod drivers;

use std::path::Path;

/// Run every regression input of every target; report all failures.
#[test]
fn every_regression_input_returns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut failed = Vec::new();
    let mut ran = 0;
    for (target, driver) in drivers::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).collect(),
            Err(e) => panic!(
                "{}: {e} (every target keeps a regressions directory)",
                dir.display()
            ),
        };
        files.sort();
        assert!(!files.is_empty(), "{} holds no inputs", dir.display());
        for f in files.iter().filter(|f| f.is_file()) {
            let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            ran += 1;
            if std::panic::catch_unwind(|| driver(&bytes)).is_err() {
                failed.push(f.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "drivers panicked on: {failed:#?}");
    assert!(ran > 0);
}

/// The valid inputs the real encoders make go through their drivers too
/// (a smoke test of the paths past the decoders).
#[test]
fn seeds_go_through_their_drivers() {
    let seeds = drivers::seeds();
    assert!(seeds.len() >= 15);
    for (target, name, bytes) in seeds {
        let (_, driver) = drivers::TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .unwrap_or_else(|| panic!("seed {name} for unknown target {target}"));
        driver(&bytes);
    }
}

/// Write the seeds as `fuzz/regressions/<target>/seed-<name>`, where
/// `fuzz/run.sh` gives them to the fuzzer as a corpus:
/// `cargo test --release --test fuzz_regressions -- --ignored write_seeds`.
#[test]
#[ignore = "writes files; run by hand after an encoder changes"]
fn write_seeds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    for (target, name, bytes) in drivers::seeds() {
        let path = root.join(target).join(format!("seed-{name}"));
        std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
