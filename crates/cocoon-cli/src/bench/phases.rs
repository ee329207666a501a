//! The phases of a pod's start and stop, read from the runtime's own debug
//! log: every milestone is an event with a `phase` field (`vm-starting`,
//! `daemons-up`, `qemu-running`, `agent-ready`, `sandbox-created`,
//! `container-created`, `container-started`, `first-output`,
//! `process-exited`, `vm-stopped`), so anyone can get the same breakdown
//! from `COCOON_LOG=debug cocoon run …` (or a shim's log at debug level).

/// The milestones in the order they happen, and the name of the phase that
/// ends at each (the first phase begins when the process starts).
pub const MILESTONES: &[(&str, &str)] = &[
    ("vm-starting", "setup (config, state dir)"),
    ("daemons-up", "daemons up (virtiofsd, vsock)"),
    ("qemu-running", "QEMU start"),
    ("agent-ready", "kernel to agent ready"),
    ("sandbox-created", "sandbox created"),
    ("container-created", "container created"),
    ("container-started", "container started"),
    ("first-output", "first output"),
    ("process-exited", "exit seen"),
    ("vm-stopped", "teardown"),
];

/// The name of the last phase: from `vm-stopped` to the process's end.
pub const EXIT_PHASE: &str = "process exit";

/// Removes ANSI colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as tracing writes
/// it (`2026-11-29T17:27:38.123456Z`).
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let h: f64 = t.next()?.parse().ok()?;
    let mi: f64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next()?.parse().ok()?;
    Some(days_from_civil(y, mo, da) as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + sec)
}

/// `(time, phase)` of one log line, if it is a milestone.
pub fn milestone(line: &str) -> Option<(f64, String)> {
    let line = strip_ansi(line);
    let ts = parse_timestamp(line.split_whitespace().next()?)?;
    let rest = &line[line.find(" phase=")? + " phase=".len()..];
    let name: String = rest
        .trim_start_matches('"')
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    (!name.is_empty()).then_some((ts, name))
}

/// The phases of one run, in milliseconds, from its log and the wall-clock
/// times (seconds since the epoch) its process started and ended. A phase
/// whose milestone is missing is left out (its time goes to the next one).
/// The first occurrence of each milestone counts.
pub fn phases(log: &str, started: f64, ended: f64) -> Vec<(&'static str, f64)> {
    let mut seen: Vec<(f64, String)> = Vec::new();
    for (t, name) in log.lines().filter_map(milestone) {
        if !seen.iter().any(|(_, n)| *n == name) {
            seen.push((t, name));
        }
    }
    let mut out = Vec::new();
    let mut last = started;
    for (m, phase) in MILESTONES {
        if let Some((t, _)) = seen.iter().find(|(_, n)| n == m) {
            out.push((*phase, (t - last) * 1000.0));
            last = *t;
        }
    }
    out.push((EXIT_PHASE, (ended - last) * 1000.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-02T00:00:01.5Z"), Some(86_401.5));
        // 2026-11-29 is day 20_786 of the epoch.
        let t = parse_timestamp("2026-11-29T17:27:38.123456Z").unwrap();
        assert!(
            (t - (20_786.0 * 86_400.0 + 62_858.123456)).abs() < 1e-6,
            "{t}"
        );
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn phases_from_a_log() {
        // As tracing's fmt writes it, colours and spans included.
        let log = "\
2026-11-29T00:00:01.000000Z  INFO starting VM sandbox=run-1 phase=\"vm-starting\" accel=Tcg
2026-11-29T00:00:01.100000Z DEBUG helper daemons ready \u{1b}[3mphase\u{1b}[0m\u{1b}[2m=\u{1b}[0m\"daemons-up\"
2026-11-29T00:00:01.300000Z DEBUG spawned what=\"QEMU\" pid=7
2026-11-29T00:00:01.400000Z DEBUG QEMU running pid=7 status=running phase=\"qemu-running\"
2026-11-29T00:00:03.400000Z  INFO agent answered sandbox=run-1 phase=\"agent-ready\" boot_ms=2000
2026-11-29T00:00:03.500000Z DEBUG sandbox created sandbox=run-1 phase=\"sandbox-created\"
2026-11-29T00:00:03.600000Z DEBUG container created phase=\"container-created\"
2026-11-29T00:00:03.700000Z DEBUG container started phase=\"container-started\"
2026-11-29T00:00:03.750000Z DEBUG first output bytes=0 phase=\"first-output\"
2026-11-29T00:00:03.800000Z DEBUG process exited status=0 phase=\"process-exited\"
2026-11-29T00:00:03.810000Z DEBUG process exited status=0 phase=\"process-exited\"
2026-11-29T00:00:04.000000Z  INFO stopped sandbox=run-1 phase=\"vm-stopped\"
";
        let t0 = parse_timestamp("2026-11-29T00:00:00.900000Z").unwrap();
        let p = phases(log, t0, t0 + 3.2);
        let names: Vec<&str> = p.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), MILESTONES.len() + 1, "{names:?}");
        let ms = |name: &str| p.iter().find(|(n, _)| *n == name).unwrap().1.round();
        assert_eq!(ms("setup (config, state dir)"), 100.0);
        assert_eq!(ms("daemons up (virtiofsd, vsock)"), 100.0);
        assert_eq!(ms("QEMU start"), 300.0);
        assert_eq!(ms("kernel to agent ready"), 2000.0);
        assert_eq!(ms("exit seen"), 50.0);
        assert_eq!(ms("teardown"), 200.0);
        assert_eq!(ms(EXIT_PHASE), 100.0);
        let total: f64 = p.iter().map(|(_, v)| v).sum();
        assert!((total - 3200.0).abs() < 0.01, "{total}");
    }

    #[test]
    fn a_missing_milestone_folds_into_the_next_phase() {
        let log = "2026-11-29T00:00:01Z INFO starting VM phase=\"vm-starting\"\n\
                   2026-11-29T00:00:03Z INFO agent answered phase=\"agent-ready\"\n";
        let t0 = parse_timestamp("2026-11-29T00:00:00Z").unwrap();
        let p = phases(log, t0, t0 + 4.0);
        assert_eq!(
            p,
            vec![
                ("setup (config, state dir)", 1000.0),
                ("kernel to agent ready", 2000.0),
                (EXIT_PHASE, 1000.0)
            ]
        );
    }
}
