//! Whether a test that needs root or a system tool may run here.
//!
//! Outside CI a missing requirement makes the test print why it skips and return early.
//! In CI (`CI` set in the environment, as `.ci/run` is started) a missing requirement is a
//! failure: CI installs everything, so a skip there would hide a broken install step.

use std::io::Write;
use std::path::PathBuf;

/// True when running under CI (`CI` is set to anything but `0`/`false`).
pub fn in_ci() -> bool {
    matches!(std::env::var("CI"), Ok(v) if !v.is_empty() && v != "0" && v != "false")
}

/// True when the effective user is root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Finds `cmd` on `PATH` (also in `/usr/sbin` and `/sbin`, where Debian keeps `ip`/`nft`).
pub fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|dir| dir.join(cmd))
        .find(|p| p.is_file())
}

fn unmet(test: &str, why: &str) -> bool {
    unmet_in(in_ci(), test, why, &mut std::io::stderr())
}

/// `out` receives the skip line; tests of this module pass a buffer so that a run of the
/// suite prints `SKIP` only for tests that really skipped.
fn unmet_in(ci: bool, test: &str, why: &str, out: &mut dyn Write) -> bool {
    if ci {
        panic!("{test}: requirement not met in CI: {why}");
    }
    let _ = writeln!(out, "SKIP {test}: {why}");
    false
}

/// Returns true if `test` may run as root; otherwise skips (or fails in CI).
pub fn require_root(test: &str) -> bool {
    is_root() || unmet(test, "needs root (network namespaces, nftables)")
}

/// Returns true if every command in `cmds` is installed; otherwise skips (or fails in CI).
pub fn require_commands(test: &str, cmds: &[&str]) -> bool {
    let missing: Vec<&str> = cmds
        .iter()
        .copied()
        .filter(|c| which(c).is_none())
        .collect();
    missing.is_empty()
        || unmet(
            test,
            &format!(
                "needs {} (Debian: apt-get install coturn redis-server wireguard-tools nftables; \
                 boringtun-cli: cargo install boringtun-cli)",
                missing.join(", ")
            ),
        )
}

/// Returns true when the workspace binaries have every flag and command the lab needs
/// (`missing` is what they lack, from `MeshBins::missing_features`); otherwise skips, or fails
/// in CI: CI builds the binaries from the same tree, so a missing flag there is a regression
/// (a renamed or removed option), never "not built yet".
pub fn require_features(test: &str, missing: Option<String>) -> bool {
    features_in(in_ci(), test, missing, &mut std::io::stderr())
}

fn features_in(ci: bool, test: &str, missing: Option<String>, out: &mut dyn Write) -> bool {
    match missing {
        None => true,
        Some(m) => unmet_in(ci, test, &format!("the meshpunch binaries lack {m}"), out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_binaries_run_in_and_outside_ci() {
        assert!(features_in(true, "t", None, &mut Vec::new()));
        assert!(features_in(false, "t", None, &mut Vec::new()));
    }

    #[test]
    fn a_missing_flag_skips_outside_ci() {
        let mut out = Vec::new();
        assert!(!features_in(
            false,
            "t",
            Some("meshpunch-relay --listen".into()),
            &mut out
        ));
        let out = String::from_utf8_lossy(&out);
        assert_eq!(
            out,
            "SKIP t: the meshpunch binaries lack meshpunch-relay --listen\n"
        );
    }

    #[test]
    fn a_missing_flag_fails_in_ci() {
        let outcome = std::panic::catch_unwind(|| {
            features_in(
                true,
                "t",
                Some("meshpunch-relay --listen".into()),
                &mut Vec::new(),
            )
        });
        let msg = outcome.expect_err("a missing flag must fail under CI");
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("lack meshpunch-relay --listen"), "{msg}");
    }
}
