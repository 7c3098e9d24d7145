//! Running the system tools (`ip`, `nft`, `sysctl`, `ping`) that build and probe the lab.
//!
//! Every command is run with its output captured; a failure becomes an [`Error::Command`]
//! carrying the command line and its stderr, so a broken set-up step says exactly what failed.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::Error;

/// Formats a command line for error messages and logs.
fn describe(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `program args…`, optionally feeding `stdin`, and returns its stdout.
pub fn run_input(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let path = crate::testenv::which(program).unwrap_or_else(|| program.into());
    let mut cmd = Command::new(path);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().map_err(|e| Error::Command {
        cmd: describe(program, args),
        detail: e.to_string(),
    })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if let Some(input) = stdin {
            detail.push_str("\ninput was:\n");
            detail.push_str(input);
        }
        return Err(Error::Command {
            cmd: describe(program, args),
            detail: format!("{}: {detail}", out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args…` and returns its stdout.
pub fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    run_input(program, args, None)
}

/// Runs `ip -n NS args…`.
pub fn ip_ns(ns: &str, args: &[&str]) -> Result<String, Error> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Runs `program args…` inside network namespace `ns` (`ip netns exec`).
pub fn exec_ns(ns: &str, program: &str, args: &[&str]) -> Result<String, Error> {
    exec_ns_input(ns, program, args, None)
}

/// Like [`exec_ns`], feeding `stdin` to the program.
pub fn exec_ns_input(
    ns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, Error> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run_input("ip", &all, stdin)
}

/// Loads an nftables ruleset (`nft -f -`) inside namespace `ns`.
pub fn nft_ns(ns: &str, ruleset: &str) -> Result<(), Error> {
    exec_ns_input(ns, "nft", &["-f", "-"], Some(ruleset)).map(|_| ())
}
