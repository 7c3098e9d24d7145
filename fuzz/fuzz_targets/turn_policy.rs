//! Fuzz the relay's tenant and peer-policy parsers: REST-API usernames → quota keys, CIDR
//! strings (`denied_peers`), and the peer policy on arbitrary IPv4/IPv6 addresses. Nothing
//! panics; a denied CIDR refuses an address in any spelling whose canonical form it contains.
#![no_main]

use std::net::{IpAddr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::addr::{canonical_ip, Cidr, DenyReason, PeerPolicy};
use meshpunch_proto::creds::Tenant;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let t = Tenant::of(&text, true);
    assert!(t.network.starts_with("net:") || t.network.starts_with("user:"));
    let _ = Tenant::of(&text, false);
    let _ = text.parse::<Cidr>();
    if data.len() >= 17 {
        let mut o = [0u8; 16];
        o.copy_from_slice(&data[..16]);
        let ip = IpAddr::V6(Ipv6Addr::from(o));
        let prefix = data[16] % 33;
        let canon = canonical_ip(ip);
        if let IpAddr::V4(v4) = canon {
            let cidr = Cidr::new(IpAddr::V4(v4), prefix).unwrap();
            let policy = PeerPolicy {
                denied: vec![cidr],
                ..PeerPolicy::default()
            };
            assert_eq!(policy.check(ip), Err(DenyReason::Denied));
        }
    }
});
