//! Shared by the meshpunch scenario tests: requirements and small helpers.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use natlab::mesh::MeshBins;

/// Root, the system tools, and the meshpunch binaries (built if missing). Skips with a printed
/// reason otherwise (a missing system requirement fails in CI, see `natlab::testenv`).
pub(crate) fn mesh_ready(test: &str, extra: &[&str]) -> Option<MeshBins> {
    let mut cmds = vec!["ip", "nft", "ping", "ss"];
    if relay_impl() == natlab::mesh::RelayImpl::Coturn {
        cmds.push("turnserver");
    }
    cmds.extend_from_slice(extra);
    if !natlab::testenv::require_root(test) || !natlab::testenv::require_commands(test, &cmds) {
        return None;
    }
    let bins = match MeshBins::find() {
        Ok(b) => b,
        Err(e) => panic!("{test}: meshpunch binaries: {e}"),
    };
    // Components still under construction are not a broken install: skip, also in CI.
    if let Some(missing) = bins.missing_features() {
        eprintln!("SKIP {test}: the meshpunch binaries lack {missing}");
        return None;
    }
    Some(bins)
}

/// `1.234 s` style.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The relay the scenarios run: `meshpunch-relay`, or coturn with `NATLAB_RELAY=coturn` (any
/// RFC 8656 server must do; `mesh_wireguard` also runs its relay leg through coturn).
pub(crate) fn relay_impl() -> natlab::mesh::RelayImpl {
    match std::env::var("NATLAB_RELAY").as_deref() {
        Ok("coturn") => natlab::mesh::RelayImpl::Coturn,
        _ => natlab::mesh::RelayImpl::Meshpunch,
    }
}
