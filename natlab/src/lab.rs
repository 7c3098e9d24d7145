//! The low-level lab: network namespaces, veth links, processes, and their teardown.
//!
//! A [`Lab`] owns every namespace it creates. Names are `<prefix>-<node>`, where the prefix is
//! `np<pid>-<n>` for a test run (unique per process and per lab) or `nl-<name>` for a lab a
//! human brought up with `natlab up`. Links are created directly inside their namespaces, so
//! deleting the namespaces removes every link, bridge, TUN device, route and nftables table.
//!
//! Teardown happens:
//! - on `Drop` (normal end of a test and unwinding after a panic): processes get SIGTERM, then
//!   SIGKILL, namespaces are deleted;
//! - when the test process dies any other way (SIGINT, SIGKILL, abort): a guardian shell,
//!   started in its own session so Ctrl-C does not reach it, waits for the process to go and
//!   then removes the lab;
//! - at the start of every run: [`cleanup_stale`] removes labs whose owning process is gone.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::sh;
use crate::Error;

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// Shell run by the guardian: waits for the owner process, then removes the lab.
const GUARDIAN: &str = r#"owner=$1; prefix=$2
while kill -0 "$owner" 2>/dev/null; do sleep 0.5; done
for ns in $(ls /run/netns 2>/dev/null); do
  case "$ns" in "$prefix"-*)
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null;;
  esac
done"#;

static LAB_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A process started inside one of the lab's namespaces.
#[derive(Debug)]
struct Proc {
    node: String,
    child: Child,
    log: PathBuf,
}

/// A set of network namespaces and the processes running in them.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    nodes: Vec<String>,
    procs: BTreeMap<String, Proc>,
    log_dir: PathBuf,
    guardian: Option<Child>,
    keep: bool,
    files: Vec<PathBuf>,
}

impl Lab {
    /// A fresh lab for a test run, removed on drop or when this process dies.
    ///
    /// Stale labs of earlier, killed runs are removed first.
    pub fn new() -> Result<Lab, Error> {
        cleanup_stale();
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("np{}-{n}", std::process::id());
        let log_dir = std::env::temp_dir().join("natlab").join(&prefix);
        let _ = std::fs::remove_dir_all(&log_dir);
        std::fs::create_dir_all(&log_dir)?;
        let guardian = spawn_guardian(&prefix)?;
        Ok(Lab {
            prefix,
            nodes: Vec::new(),
            procs: BTreeMap::new(),
            log_dir,
            guardian: Some(guardian),
            keep: false,
            files: Vec::new(),
        })
    }

    /// A lab that outlives this process (for `natlab up NAME`); removed by [`Lab::down`].
    pub fn persistent(name: &str) -> Result<Lab, Error> {
        let prefix = persistent_prefix(name);
        let log_dir = std::env::temp_dir().join("natlab").join(&prefix);
        std::fs::create_dir_all(&log_dir)?;
        Ok(Lab {
            prefix,
            nodes: Vec::new(),
            procs: BTreeMap::new(),
            log_dir,
            guardian: None,
            keep: true,
            files: Vec::new(),
        })
    }

    /// Removes a persistent lab brought up with `natlab up NAME`. Returns the namespaces removed.
    pub fn down(name: &str) -> Vec<String> {
        remove_prefix(&persistent_prefix(name))
    }

    /// The prefix of every namespace name of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Directory holding the log file of every process started in the lab.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Full namespace name of `node`.
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Nodes created so far, in creation order.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Creates namespace for `node` with loopback up, forwarding as asked and `rp_filter` off
    /// (the shaper's TUN device re-injects packets on another interface than they left by).
    pub fn add_node(&mut self, node: &str, forward: bool) -> Result<String, Error> {
        let ns = self.ns(node);
        sh::run("ip", &["netns", "add", &ns])?;
        self.nodes.push(node.to_string());
        let fwd = format!("net.ipv4.ip_forward={}", u8::from(forward));
        sh::exec_ns(
            &ns,
            "sysctl",
            &[
                "-qw",
                &fwd,
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        sh::ip_ns(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Creates a veth pair between `a` (interface `a_if`) and `b` (interface `b_if`), both up.
    pub fn link(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<(), Error> {
        let (na, nb) = (self.ns(a), self.ns(b));
        sh::run(
            "ip",
            &[
                "link", "add", a_if, "netns", &na, "type", "veth", "peer", "name", b_if, "netns",
                &nb,
            ],
        )?;
        sh::ip_ns(&na, &["link", "set", a_if, "up"])?;
        sh::ip_ns(&nb, &["link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Runs `ip -n <node> args…`.
    pub fn ip(&self, node: &str, args: &[&str]) -> Result<String, Error> {
        sh::ip_ns(&self.ns(node), args)
    }

    /// Loads an nftables ruleset into `node`.
    pub fn nft(&self, node: &str, ruleset: &str) -> Result<(), Error> {
        sh::nft_ns(&self.ns(node), ruleset)
    }

    /// Runs a command to completion inside `node` and returns its stdout.
    pub fn exec(&self, node: &str, program: &str, args: &[&str]) -> Result<String, Error> {
        sh::exec_ns(&self.ns(node), program, args)
    }

    /// Runs a command to completion inside `node`; returns whether it succeeded and its stdout
    /// (for tools such as `ping` whose exit status reports loss).
    pub fn exec_any(
        &self,
        node: &str,
        program: &str,
        args: &[&str],
    ) -> Result<(bool, String), Error> {
        let ip = crate::testenv::which("ip").unwrap_or_else(|| "ip".into());
        let out = Command::new(ip)
            .args(["netns", "exec", &self.ns(node), program])
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Starts a long-running process named `name` inside `node`; stdout and stderr go to
    /// `<log_dir>/<name>.log`. The name must be unique among running processes of the lab.
    pub fn spawn(
        &mut self,
        node: &str,
        name: &str,
        program: &Path,
        args: &[String],
    ) -> Result<(), Error> {
        self.spawn_env(node, name, program, args, &[])
    }

    /// Like [`Lab::spawn`] with extra environment variables.
    pub fn spawn_env(
        &mut self,
        node: &str,
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<(), Error> {
        if let Some(mut old) = self.procs.remove(name) {
            stop_child(&mut old.child);
        }
        let log = self.log_dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let ip = crate::testenv::which("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", &self.ns(node)])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if self.keep {
            // A persistent lab's processes must survive the terminal that started them.
            // SAFETY: setsid is async-signal-safe and has no preconditions.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| Error::Command {
            cmd: format!("{} {}", program.display(), args.join(" ")),
            detail: e.to_string(),
        })?;
        self.procs.insert(
            name.to_string(),
            Proc {
                node: node.to_string(),
                child,
                log,
            },
        );
        Ok(())
    }

    /// Removes `path` at teardown (files outside the namespaces, e.g. a control socket).
    pub fn remove_on_teardown(&mut self, path: PathBuf) {
        self.files.push(path);
    }

    /// True while process `name` runs.
    pub fn is_running(&mut self, name: &str) -> bool {
        match self.procs.get_mut(name) {
            Some(p) => matches!(p.child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends signal `sig` (e.g. `libc::SIGHUP`) to process `name`; false if it is not running.
    pub fn signal(&mut self, name: &str, sig: i32) -> bool {
        if !self.is_running(name) {
            return false;
        }
        let Some(p) = self.procs.get(name) else {
            return false;
        };
        // `ip netns exec` execs the program, so the child's pid is the program's.
        // SAFETY: plain kill(2) to our own running child.
        unsafe { libc::kill(p.child.id() as i32, sig) == 0 }
    }

    /// Process id of process `name` while it is known (the program itself: `ip netns exec`
    /// execs it), e.g. to read its CPU time from `/proc/<pid>/stat`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(|p| p.child.id())
    }

    /// Stops process `name` (SIGTERM, SIGKILL after 3 s) and returns its log.
    pub fn stop(&mut self, name: &str) -> Option<String> {
        let mut p = self.procs.remove(name)?;
        stop_child(&mut p.child);
        std::fs::read_to_string(&p.log).ok()
    }

    /// The log so far of process `name` (also after it stopped).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Prints the last `lines` lines of every process log to stderr (for failing tests).
    pub fn dump_logs(&self, lines: usize) {
        let Ok(dir) = std::fs::read_dir(&self.log_dir) else {
            return;
        };
        let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            eprintln!("----- {} (last {} lines) -----", f.display(), tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }

    /// Node a running process was started in.
    pub fn node_of(&self, name: &str) -> Option<&str> {
        self.procs.get(name).map(|p| p.node.as_str())
    }

    /// Runs `f` on a thread that has entered `node`'s network namespace; sockets it creates
    /// stay in that namespace for their whole life, wherever they are used afterwards.
    pub fn in_ns<T: Send + 'static>(
        &self,
        node: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Error> {
        in_netns(&self.ns(node), f)
    }

    /// Binds a UDP socket inside `node`.
    pub fn udp_socket(
        &self,
        node: &str,
        addr: std::net::SocketAddr,
    ) -> Result<std::net::UdpSocket, Error> {
        self.in_ns(node, move || std::net::UdpSocket::bind(addr))?
            .map_err(Error::from)
    }

    /// Stops every process and removes every namespace now (also done on drop).
    pub fn teardown(&mut self) {
        let names: Vec<String> = self.procs.keys().cloned().collect();
        for n in names {
            if let Some(mut p) = self.procs.remove(&n) {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
        for node in self.nodes.drain(..).rev() {
            remove_ns(&format!("{}-{node}", self.prefix));
        }
        // Anything a half-finished set-up created but did not record.
        remove_prefix(&self.prefix);
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
        if let Some(mut g) = self.guardian.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }

    /// Leaves namespaces and processes in place when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
        if let Some(mut g) = self.guardian.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs(40);
        }
        if !self.keep {
            self.teardown();
        }
    }
}

fn persistent_prefix(name: &str) -> String {
    format!("nl-{name}")
}

fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain kill(2) on a child we own and have not reaped yet.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn spawn_guardian(prefix: &str) -> Result<Child, Error> {
    let mut cmd = Command::new("/bin/sh");
    cmd.args([
        "-c",
        GUARDIAN,
        "natlab-guardian",
        &std::process::id().to_string(),
        prefix,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; it puts the guardian out of reach of Ctrl-C.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

/// Every namespace name that exists now.
pub fn list_namespaces() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Kills every process in namespace `ns` and deletes it.
fn remove_ns(ns: &str) {
    if let Ok(pids) = sh::run("ip", &["netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill(2) on a pid inside the lab's own namespace.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let _ = sh::run("ip", &["netns", "del", ns]);
}

/// Removes every namespace whose name starts with `prefix-`. Returns their names.
fn remove_prefix(prefix: &str) -> Vec<String> {
    let want = format!("{prefix}-");
    let gone: Vec<String> = list_namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&want))
        .collect();
    for ns in &gone {
        remove_ns(ns);
    }
    gone
}

/// Removes labs (`np<pid>-…`) left behind by test processes that no longer exist.
pub fn cleanup_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for ns in list_namespaces() {
        let Some(rest) = ns.strip_prefix("np") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            remove_ns(&ns);
            removed.push(ns);
        }
    }
    removed
}

/// Runs `f` on a new thread that entered the named network namespace.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Error> {
    let path = Path::new(NETNS_DIR).join(ns);
    let file =
        File::open(&path).map_err(|e| Error::Setup(format!("open {}: {e}", path.display())))?;
    let handle = std::thread::spawn(move || -> Result<T, Error> {
        // SAFETY: setns on this thread only; the fd is valid for the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(Error::Setup(format!(
                "setns: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| Error::Setup("namespace thread panicked".into()))?
}
