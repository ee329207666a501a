//! The sections of `cocoon bench`. Each runs its systems in turn within
//! each run, and records what failed as a note instead of stopping.

mod exec;
mod files;
mod pods;
mod start;

pub use exec::{exec, idle, stdout};
pub use files::files;
pub use pods::pods;
pub use start::start;

use std::time::{Duration, SystemTime};

use anyhow::Result;

use crate::bench::ctr::{Ctr, Runtime};
use crate::bench::report::Report;
use crate::bench::Env;
use pods::remove_all;

pub(super) const SLEEP: &[&str] = &["sleep", "3600"];

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn epoch(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Samples of one figure and the errors met taking them.
#[derive(Default)]
pub(super) struct Series {
    samples: Vec<f64>,
    errors: Vec<String>,
}

impl Series {
    pub(super) fn push(&mut self, r: Result<f64>) {
        match r {
            Ok(v) => self.samples.push(v),
            Err(e) => {
                eprintln!("cocoon bench: {e:#}");
                self.errors.push(format!("{e:#}"));
            }
        }
    }

    pub(super) fn add_to(
        self,
        report: &mut Report,
        section: &str,
        measure: &str,
        system: &str,
        unit: &str,
    ) {
        if self.errors.is_empty() {
            report.add(section, measure, system, unit, self.samples);
        } else {
            // The first error's first line, short enough for a table cell
            // (the whole of each went to stderr).
            let first = self.errors[0].lines().next().unwrap_or_default();
            let mut e: String = first.chars().take(120).collect();
            if e.len() < first.len() {
                e.push('…');
            }
            let note = format!("{} failed: {e}", self.errors.len());
            report.add_noted(section, measure, system, unit, self.samples, &note);
        }
    }
}

/// A name unique within this bench run.
pub(super) fn uid(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "bench-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub(super) fn progress(msg: &str) {
    eprintln!("cocoon bench: {msg}");
}

/// The runtimes compared through containerd: Cocoon on the first flavour,
/// and runc.
pub(super) fn pod_runtimes(env: &Env) -> Vec<Runtime> {
    let (label, path) = &env.flavours[0];
    vec![Runtime::cocoon(label, path), Runtime::runc()]
}

// ---------------------------------------------------------------- start

/// Runs `f` with one idle container per runtime, removed afterwards.
pub(super) fn with_containers<T>(
    ctr: &Ctr,
    runtimes: &[Runtime],
    f: impl FnOnce(&[(Runtime, String)]) -> T,
) -> Result<T> {
    let mut up = Vec::new();
    for rt in runtimes {
        let id = uid("idle");
        if let Err(e) = ctr.start(rt, &[], &id, SLEEP) {
            remove_all(
                ctr,
                &up.iter()
                    .map(|(_, i): &(Runtime, String)| i.clone())
                    .collect::<Vec<_>>(),
            );
            return Err(e);
        }
        up.push((rt.clone(), id));
    }
    let r = f(&up);
    let ids: Vec<String> = up.into_iter().map(|(_, i)| i).collect();
    remove_all(ctr, &ids);
    Ok(r)
}
