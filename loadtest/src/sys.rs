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
}
