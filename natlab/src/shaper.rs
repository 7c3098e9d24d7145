//! User-space latency and loss, because this kernel has no netem.
//!
//! The lab routes the traffic to shape into a TUN device (policy routing: `ip rule … lookup
//! <table>`, table `default dev <tun>`). [`run`] attaches to that device, reads each IP packet,
//! drops it with probability `loss`, and writes it back to the same device once `delay` has
//! passed. A packet written back enters the kernel with `iif <tun>`, which a higher-priority
//! rule sends through the main table to its real destination. Packets keep their order
//! (constant delay, FIFO queue).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rand::Rng;

use crate::Error;

/// `TUNSETIFF` ioctl request (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Largest packet the shaper carries (the links' MTU is 1500; GSO is off on TUN).
const MAX_PACKET: usize = 65_535;

/// What the shaper does to each packet.
#[derive(Debug, Clone, Copy)]
pub struct ShapeConfig {
    /// Added one-way delay.
    pub delay: Duration,
    /// Probability in `[0, 1]` that a packet is dropped.
    pub loss: f64,
}

/// Packet counters of a running shaper.
#[derive(Debug, Default)]
pub struct ShapeStats {
    /// Packets read from the TUN device.
    pub received: AtomicU64,
    /// Packets dropped to emulate loss.
    pub dropped: AtomicU64,
    /// Packets written back after the delay.
    pub forwarded: AtomicU64,
}

/// Opens TUN device `name` (creating it if needed) in packet mode without packet info.
pub fn open_tun(name: &str) -> Result<File, Error> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(Error::Setup(format!("interface name {name:?} is too long")));
    }
    // struct ifreq: 16 bytes of name, then a union whose first member is `short ifr_flags`.
    let mut ifr = [0u8; 40];
    ifr[..bytes.len()].copy_from_slice(bytes);
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: ifr is a properly sized, initialised ifreq buffer that outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) };
    if rc < 0 {
        return Err(Error::Setup(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(file)
}

/// Shapes traffic of TUN device `tun` until `stop` is set (checked every 100 ms when idle).
pub fn run(
    tun: &str,
    cfg: ShapeConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<ShapeStats>,
) -> Result<(), Error> {
    if !(0.0..=1.0).contains(&cfg.loss) {
        return Err(Error::Setup(format!(
            "loss {} is not a probability",
            cfg.loss
        )));
    }
    let mut reader = open_tun(tun)?;
    let mut writer = reader.try_clone()?;
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();

    let wstop = stop.clone();
    let wstats = stats.clone();
    let write_thread = std::thread::spawn(move || {
        while !wstop.load(Ordering::Relaxed) {
            let Ok((due, pkt)) = rx.recv_timeout(Duration::from_millis(100)) else {
                continue;
            };
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if writer.write_all(&pkt).is_ok() {
                wstats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; MAX_PACKET];
    let fd = reader.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 100) };
        if n <= 0 {
            continue;
        }
        let len = match reader.read(&mut buf) {
            Ok(len) => len,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        stats.received.fetch_add(1, Ordering::Relaxed);
        if cfg.loss > 0.0 && rng.gen_bool(cfg.loss) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if tx.send((now + cfg.delay, buf[..len].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = write_thread.join();
    Ok(())
}

/// Parses a duration such as `25ms`, `1.5s`, `200us` or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "ms"),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => return Err(format!("bad duration unit in {s:?} (use s, ms or us)")),
    };
    if !(0.0..=3600.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("25ms"), Ok(Duration::from_millis(25)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("40"), Ok(Duration::from_millis(40)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
