//! The rendezvous example configs under deploy/examples are real configs: each parses and
//! validates with the server's own `Config` type (unknown keys are errors), and each Redis URL in
//! them is one the Redis registry accepts. deploy/validate checks the relay examples and that the
//! Kubernetes ConfigMaps are copies of these files.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use meshpunch_rendezvous::registry::redis::config_from;
use meshpunch_rendezvous::Config;

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/examples")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".toml") && name.contains("rendezvous")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn redis_deploy_example_rendezvous_configs_are_valid() {
    let files = examples();
    assert!(files.len() >= 3, "examples found: {files:?}");
    for f in files {
        let cfg = Config::from_file(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if cfg.registry.redis_url.is_some() || cfg.registry.presence_ttl.is_some() {
            // The compose/k8s examples get the URL from the command line: use a stand-in.
            let mut reg = cfg.registry.clone();
            reg.redis_url
                .get_or_insert_with(|| "redis://redis:6379/".into());
            config_from(&reg, "node-1".into()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
        eprintln!("ok {}: {} relay region(s)", f.display(), cfg.relays.len());
    }
}
