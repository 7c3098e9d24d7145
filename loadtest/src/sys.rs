//! Process measurements from `/proc`: resident memory and CPU time of a server under test,
//! and CPU time of the load generator itself.

use std::time::Duration;

/// Resident set size (`VmRSS`) of process `pid` in KiB, from `/proc/<pid>/status`.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU time consumed so far by process `pid` (all its threads).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_second(),
    ))
}

/// CPU time consumed so far by this process.
pub fn self_cpu_time() -> Duration {
    cpu_time(std::process::id()).unwrap_or_default()
}

/// Measures a process's CPU use over an interval: call [`CpuMeter::start`], then
/// [`CpuMeter::percent`] at the end (100 = one core busy).
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    pid: u32,
    cpu: Duration,
    at: std::time::Instant,
}

impl CpuMeter {
    /// Starts measuring `pid`; `None` if it does not exist.
    pub fn start(pid: u32) -> Option<CpuMeter> {
        Some(CpuMeter {
            pid,
            cpu: cpu_time(pid)?,
            at: std::time::Instant::now(),
        })
    }

    /// CPU time used since [`Self::start`].
    pub fn used(&self) -> Option<Duration> {
        cpu_time(self.pid)?.checked_sub(self.cpu)
    }

    /// CPU percent since [`Self::start`].
    pub fn percent(&self) -> Option<f64> {
        let used = cpu_time(self.pid)?.checked_sub(self.cpu)?;
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        Some(used.as_secs_f64() / wall * 100.0)
    }
}

fn rusage(who: libc::c_int) -> Duration {
    // SAFETY: rusage is plain old data; getrusage only writes it.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid `who` constant and a pointer to our struct.
    if unsafe { libc::getrusage(who, &mut r) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(r.ru_utime) + tv(r.ru_stime)
}

/// User + system CPU time of the calling thread (`getrusage(RUSAGE_THREAD)`).
pub fn thread_cpu_time() -> Duration {
    rusage(libc::RUSAGE_THREAD)
}

/// User + system CPU time of this whole process, all threads (`getrusage(RUSAGE_SELF)`).
pub fn process_cpu_time() -> Duration {
    rusage(libc::RUSAGE_SELF)
}

/// CPUs this process may run on (`sched_getaffinity`), at least 1.
pub fn allowed_cpus() -> usize {
    // SAFETY: cpu_set_t is plain old data; sched_getaffinity only writes it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return 1;
        }
        (libc::CPU_COUNT(&set) as usize).max(1)
    }
}

/// UDP counters of this network namespace from `/proc/net/snmp` (all sockets of the host,
/// the server's included).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams dropped because a socket's receive buffer was full.
    pub rcvbuf_errors: u64,
    /// Datagrams dropped because a socket's send buffer was full.
    pub sndbuf_errors: u64,
    /// All receive errors (includes `rcvbuf_errors` and checksum errors).
    pub in_errors: u64,
}

impl UdpCounters {
    /// Counter growth from `earlier` to `self`.
    pub fn since(&self, earlier: &UdpCounters) -> UdpCounters {
        UdpCounters {
            rcvbuf_errors: self.rcvbuf_errors.saturating_sub(earlier.rcvbuf_errors),
            sndbuf_errors: self.sndbuf_errors.saturating_sub(earlier.sndbuf_errors),
            in_errors: self.in_errors.saturating_sub(earlier.in_errors),
        }
    }
}

/// Parses the two `Udp:` lines (names, then values) of `/proc/net/snmp` text.
pub fn parse_udp_snmp(text: &str) -> Option<UdpCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let values: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let get = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i).copied())
    };
    Some(UdpCounters {
        rcvbuf_errors: get("RcvbufErrors")?,
        sndbuf_errors: get("SndbufErrors")?,
        in_errors: get("InErrors")?,
    })
}

/// The UDP counters of this network namespace now; `None` where `/proc/net/snmp` is missing.
pub fn udp_counters() -> Option<UdpCounters> {
    parse_udp_snmp(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

/// Raises the open-file limit to the hard limit (many client sockets) and returns it.
pub fn raise_nofile_limit() -> u64 {
    // SAFETY: rlimit is plain old data; getrlimit/setrlimit only read/write it.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_rss_and_cpu_are_readable() {
        assert!(rss_kib(std::process::id()).unwrap_or(0) > 0);
        assert!(cpu_time(std::process::id()).is_some());
        assert!(rss_kib(u32::MAX).is_none());
    }

    #[test]
    fn udp_snmp_counters_are_parsed_by_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
            Udp: 100 2 7 90 5 3 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors\n\
            UdpLite: 0 0 0 0 0 0 0\n";
        let c = parse_udp_snmp(text).unwrap();
        assert_eq!(
            c,
            UdpCounters {
                rcvbuf_errors: 5,
                sndbuf_errors: 3,
                in_errors: 7
            }
        );
        assert!(parse_udp_snmp("Udp: InErrors\nUdp: x\n").is_none());
        assert!(udp_counters().is_some());
        assert!(allowed_cpus() >= 1);
        let t0 = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() >= t0);
        assert!(process_cpu_time() >= thread_cpu_time());
    }
}
