//! Finding the workspace binaries a scenario runs (`natlab`, `meshpunch`,
//! `meshpunch-rendezvous`, `meshpunch-relay`).
//!
//! A test executable lives in `target/<profile>/deps/`; the binaries are in its parent's parent
//! (`scripts/test` runs `cargo build --workspace --bins` first). If one is missing it is built
//! with `cargo build -p <package> --bin <name>`, into the same target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// Directories that may hold the workspace binaries, best first.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            dirs.push(dir.to_path_buf());
            if dir.file_name().is_some_and(|n| n == "deps") {
                if let Some(up) = dir.parent() {
                    dirs.insert(0, up.to_path_buf());
                }
            }
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t).join("debug"));
    }
    dirs
}

/// Looks for binary `name` without building it.
pub fn locate(name: &str) -> Option<PathBuf> {
    candidate_dirs()
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Finds binary `name` of package `package`, building it if it is missing.
pub fn find(package: &str, name: &str) -> Result<PathBuf, Error> {
    if let Some(p) = locate(name) {
        return Ok(p);
    }
    build(package, name)?;
    locate(name).ok_or_else(|| Error::Setup(format!("binary {name} not found after building it")))
}

/// Runs `cargo build -p package --bin name` into the target directory the tests run from.
fn build(package: &str, name: &str) -> Result<(), Error> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", package, "--bin", name]);
    // Build into the target directory this test runs from, so `locate` finds it.
    if let Some(target) = candidate_dirs()
        .first()
        .and_then(|d| d.parent())
        .map(Path::to_path_buf)
    {
        if std::env::var_os("CARGO_TARGET_DIR").is_none() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
    }
    if let Some(root) = workspace_root() {
        cmd.current_dir(root);
    }
    let status = cmd
        .status()
        .map_err(|e| Error::Setup(format!("cargo build -p {package}: {e}")))?;
    if !status.success() {
        return Err(Error::Setup(format!(
            "cargo build -p {package} --bin {name} failed: {status}"
        )));
    }
    Ok(())
}

/// The workspace root (parent of this crate's manifest directory).
pub fn workspace_root() -> Option<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
}
