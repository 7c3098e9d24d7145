//! A progress bar for runs longer than a few seconds, shown only when stderr is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::Progress;

/// Runs shorter than this get no bar.
pub const MIN_BAR_RUN: Duration = Duration::from_secs(3);

/// True when a bar should be drawn for a run of `expected` length.
pub fn wanted(expected: Duration) -> bool {
    expected >= MIN_BAR_RUN && std::io::stderr().is_terminal()
}

/// A ticking bar over a run of known length; drop it (or call [`Bar::finish`]) to clear it.
pub struct Bar {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Bar {
    /// Starts a bar labelled `label` that fills over `expected` and shows the live counters
    /// of `progress`; returns an inert bar when [`wanted`] says no.
    pub fn start(label: &str, expected: Duration, progress: Arc<Progress>) -> Bar {
        let stop = Arc::new(AtomicBool::new(false));
        if !wanted(expected) {
            return Bar { stop, handle: None };
        }
        let total_ms = expected.as_millis().max(1) as u64;
        let pb = ProgressBar::new(total_ms);
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed_precise} {msg}")
        {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_prefix(label.to_string());
        let s = stop.clone();
        let handle = thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::Relaxed) {
                pb.set_position((start.elapsed().as_millis() as u64).min(total_ms));
                pb.set_message(format!(
                    "sent {} received {}",
                    progress.sent.load(Ordering::Relaxed),
                    progress.received.load(Ordering::Relaxed)
                ));
                thread::sleep(Duration::from_millis(200));
            }
            pb.finish_and_clear();
        });
        Bar {
            stop,
            handle: Some(handle),
        }
    }

    /// Clears the bar.
    pub fn finish(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.stop_now();
    }
}
