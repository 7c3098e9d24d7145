//! `meshpunch netcheck --json` behind every NAT of the lab must report what the NAT does
//! (the same answers coturn's turnutils_natdiscovery gives, see coturn_natdiscovery.rs):
//! mapping from two server addresses, filtering from RFC 5780 CHANGE-REQUEST.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use natlab::mesh::Mesh;
use natlab::{Nat, TopologySpec};

#[test]
fn netcheck_classifies_every_lab_nat() {
    let test = "netcheck_classifies_every_lab_nat";
    if support::mesh_ready(test, &[]).is_none() {
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
    let mut spec = TopologySpec::new().server_delay(Duration::from_millis(5));
    for (name, nat) in sites {
        spec = spec.site(name, nat, 1);
    }
    let mesh = Mesh::start_with(spec.build().unwrap(), support::relay_impl()).unwrap();
    println!("\nmeshpunch netcheck in each NAT:");
    println!(
        "{:<6} {:<16} {:<5} {:<28} {:<28} public_addr",
        "host", "NAT", "udp", "mapping", "filtering"
    );
    let mut failures = Vec::new();
    for (site, nat) in sites {
        let h = format!("{site}1");
        let r = match mesh.netcheck(&h) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{h} ({nat}): {e}"));
                continue;
            }
        };
        let s = |k: &str| {
            r.get(k)
                .map(|v| v.to_string().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        println!(
            "{:<6} {:<16} {:<5} {:<28} {:<28} {}",
            h,
            nat.name(),
            s("udp"),
            s("mapping"),
            s("filtering"),
            s("public_addr")
        );
        let public = mesh.topo.host(&h).unwrap().public_ip.to_string();
        if s("udp") != "true" || !s("public_addr").starts_with(&format!("{public}:")) {
            failures.push(format!(
                "{h} ({nat}): udp {} public_addr {} (want {public})",
                s("udp"),
                s("public_addr")
            ));
        }
        if s("mapping") != nat.expected_mapping() {
            failures.push(format!(
                "{h} ({nat}): mapping {} != {}",
                s("mapping"),
                nat.expected_mapping()
            ));
        }
        if s("filtering") != nat.expected_filtering() {
            failures.push(format!(
                "{h} ({nat}): filtering {} != {}",
                s("filtering"),
                nat.expected_filtering()
            ));
        }
    }
    assert!(failures.is_empty(), "netcheck: {failures:#?}");
}
