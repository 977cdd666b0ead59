//! Marks the tests that need the real datasets as ignored when they are absent, so a test
//! run's summary counts them as skipped instead of passed. The data lives beside the checkout
//! (`../shared/data`, never committed: its license forbids redistribution) or where
//! `TANDEM_SHARED_DATA` points.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tandem_no_shared_data)");
    println!("cargo::rerun-if-env-changed=TANDEM_SHARED_DATA");
    let dir = std::env::var_os("TANDEM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default())
                .join("../../../shared/data")
        });
    if !dir.join("ml-100k.interactions.csv.gz").is_file() {
        println!("cargo::rustc-cfg=tandem_no_shared_data");
    }
    // Rerun when the data folder (or, while it is missing, its parent) changes; with neither,
    // only this file: `cargo clean -p tandem-cli` picks up data placed later.
    let watched = [Some(dir.as_path()), dir.parent()]
        .into_iter()
        .flatten()
        .find(|d| d.is_dir());
    match watched {
        Some(d) => println!("cargo::rerun-if-changed={}", d.display()),
        None => println!("cargo::rerun-if-changed=build.rs"),
    }
}
