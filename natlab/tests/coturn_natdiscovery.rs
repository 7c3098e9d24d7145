//! A third party checks the lab's NATs: coturn's `turnserver` on the server's two addresses
//! (RFC 5780 enabled) and `turnutils_natdiscovery` from a host behind each NAT must report the
//! mapping and filtering behaviour DESIGN.md's table promises.
//!
//! Needs root, `ip`, `nft`, `turnserver`, `turnutils_natdiscovery`; skips otherwise (fails in CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use natlab::topo::{SERVER_ALTERNATE, SERVER_PRIMARY};
use natlab::{Nat, TopologySpec};

fn coturn_words(nat: Nat) -> (&'static str, &'static str) {
    let mapping = match nat.expected_mapping() {
        "endpoint-independent" | "none" => "Endpoint Independent Mapping",
        _ => "Address and Port Dependent Mapping",
    };
    let filtering = match nat.expected_filtering() {
        "endpoint-independent" => "Endpoint Independent Filtering",
        _ => "Address and Port Dependent Filtering",
    };
    (mapping, filtering)
}

#[test]
fn coturn_natdiscovery_sees_every_nat_behaviour_as_designed() {
    let test = "coturn_natdiscovery_sees_every_nat_behaviour_as_designed";
    if !natlab::testenv::require_root(test)
        || !natlab::testenv::require_commands(
            test,
            &["ip", "nft", "turnserver", "turnutils_natdiscovery"],
        )
    {
        return;
    }
    let sites = [
        ("op", Nat::Open),
        ("pr", Nat::PortRestricted),
        ("fc", Nat::FullCone),
        ("sy", Nat::Symmetric),
        ("dn", Nat::DoubleNat),
        ("ub", Nat::UdpBlocked),
    ];
    let mut spec = TopologySpec::new();
    for (name, nat) in sites {
        spec = spec.site(name, nat, 1);
    }
    let mut t = spec.build().unwrap();
    // `-c /dev/null`: Debian's /etc/turnserver.conf says no-rfc5780.
    let turnserver = natlab::testenv::which("turnserver").unwrap();
    let pidfile = t.lab.log_dir().join("turnserver.pid").display().to_string();
    let args: Vec<String> = [
        "-c",
        "/dev/null",
        "--pidfile",
        &pidfile,
        "--listening-ip",
        &SERVER_PRIMARY.to_string(),
        "--listening-ip",
        &SERVER_ALTERNATE.to_string(),
        "--listening-port",
        "3478",
        "--no-auth",
        "--no-tls",
        "--no-dtls",
        "--no-cli",
        "--log-file",
        "stdout",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = t.server.clone();
    t.lab
        .spawn(&server, "turnserver", &turnserver, &args)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t
        .lab
        .exec(&server, "ss", &["-uln"])
        .unwrap()
        .contains(&format!("{SERVER_ALTERNATE}:3479"))
    {
        assert!(
            Instant::now() < deadline,
            "turnserver did not open its RFC 5780 ports"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // natdiscovery waits for timeouts in its filtering tests: run the hosts in parallel.
    let handles: Vec<_> = sites
        .iter()
        .map(|&(name, nat)| {
            let ns = t.lab.ns(&format!("{name}1"));
            std::thread::spawn(move || {
                let out = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "turnutils_natdiscovery",
                        "-m",
                        "-f",
                        &SERVER_PRIMARY.to_string(),
                    ])
                    .output()
                    .unwrap();
                (nat, String::from_utf8_lossy(&out.stdout).into_owned())
            })
        })
        .collect();
    println!(
        "{:<16} {:<36} {:<38}",
        "NAT", "coturn mapping", "coturn filtering"
    );
    let mut failures = Vec::new();
    for h in handles {
        let (nat, out) = h.join().unwrap();
        let pick = |kind: &str| {
            out.lines()
                .find(|l| l.starts_with("NAT with") && l.contains(kind))
                .map(|l| {
                    l.trim_start_matches("NAT with ")
                        .trim_end_matches('!')
                        .to_string()
                })
                .unwrap_or_else(|| "(no answer)".to_string())
        };
        let (mapping, filtering) = (pick("Mapping"), pick("Filtering"));
        println!("{:<16} {:<36} {:<38}", nat.name(), mapping, filtering);
        let (want_m, want_f) = coturn_words(nat);
        if mapping != want_m || filtering != want_f {
            failures.push(format!(
                "{nat}: got {mapping} / {filtering}, want {want_m} / {want_f}\n{out}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
