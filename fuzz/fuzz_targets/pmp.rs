//! Fuzzes the NAT-PMP response decoder and the port mapper fed NAT-PMP-looking answers.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use meshpunch_proto::portmap::{pmp, Mapper, MapperConfig, SERVER_PORT};

fuzz_target!(|data: &[u8]| {
    let _ = pmp::parse_response(data);
    let gw = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1));
    let mut m = Mapper::new(MapperConfig {
        gateway: gw,
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
        internal_port: 41641,
        lifetime: 7200,
        upnp: false,
        nonce: [0; 12],
    });
    let now = Instant::now();
    m.start(now);
    m.handle_datagram(now, SocketAddr::new(gw, SERVER_PORT), data);
    while m.poll_transmit().is_some() {}
    while m.poll_event().is_some() {}
});
