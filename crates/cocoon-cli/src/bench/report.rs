//! What a benchmark run found: rows of samples, their statistics, and the
//! three ways they are shown (a markdown table, JSON, a chart).

use serde::Serialize;

/// Median, min and max of one row's samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    /// `None` for no samples. The median of an even count is the mean of
    /// the middle two.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// A number for a table: few significant digits, no false precision.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `median (min–max) unit`, or the median alone for one sample.
pub fn cell(s: &Stats, unit: &str) -> String {
    let sep = if unit.is_empty() || unit == "×" {
        ""
    } else {
        " "
    };
    if s.n == 1 || s.min == s.max {
        format!("{}{sep}{unit}", num(s.median))
    } else {
        format!(
            "{} ({}–{}){sep}{unit}",
            num(s.median),
            num(s.min),
            num(s.max)
        )
    }
}

/// One measured figure of one system.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub section: String,
    pub measure: String,
    pub system: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub stats: Option<Stats>,
    /// Why samples are missing, or what the figure includes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Header {
    pub date: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub accel: String,
    pub qemu: String,
    pub containerd: String,
    pub runs: usize,
    pub sections: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub header: Header,
    pub rows: Vec<Row>,
    /// Free text per section (what was left out, and why).
    pub notes: Vec<(String, String)>,
}

impl Report {
    pub fn new(header: Header) -> Self {
        Self {
            header,
            ..Default::default()
        }
    }

    /// Adds `samples` of `measure` on `system`; the stats are computed here.
    pub fn add(
        &mut self,
        section: &str,
        measure: &str,
        system: &str,
        unit: &str,
        samples: Vec<f64>,
    ) {
        self.rows.push(Row {
            section: section.into(),
            measure: measure.into(),
            system: system.into(),
            unit: unit.into(),
            stats: Stats::of(&samples),
            samples,
            note: None,
        });
    }

    /// Like [`Report::add`], with a note shown beside the figure.
    pub fn add_noted(
        &mut self,
        section: &str,
        measure: &str,
        system: &str,
        unit: &str,
        samples: Vec<f64>,
        note: &str,
    ) {
        self.add(section, measure, system, unit, samples);
        if let Some(r) = self.rows.last_mut() {
            r.note = Some(note.into());
        }
    }

    pub fn note(&mut self, section: &str, text: impl Into<String>) {
        self.notes.push((section.into(), text.into()));
    }

    /// The rows of `section`, in the order they were added.
    pub fn section(&self, section: &str) -> impl Iterator<Item = &Row> {
        let s = section.to_string();
        self.rows.iter().filter(move |r| r.section == s)
    }

    pub fn markdown(&self) -> String {
        let h = &self.header;
        let mut out = String::new();
        out.push_str(&format!(
            "Cocoon benchmarks, {}\n\n\
             - machine: {}, {} cores, {:.0} GiB, Linux {}\n\
             - accelerator: {}; {}; containerd {}\n\
             - each figure: median (min–max) of {} runs, the systems compared measured in turn within each run\n\n",
            h.date, h.cpu, h.cores, h.memory_gib, h.kernel, h.accel, h.qemu, h.containerd, h.runs
        ));
        let mut sections: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !sections.contains(&r.section.as_str()) {
                sections.push(&r.section);
            }
        }
        for (s, _) in &self.notes {
            if !sections.contains(&s.as_str()) {
                sections.push(s);
            }
        }
        for s in sections {
            out.push_str(&format!("### {s}\n\n"));
            let rows: Vec<&Row> = self.section(s).collect();
            if !rows.is_empty() {
                out.push_str("| measure | system | median (min–max) |\n|---|---|---|\n");
                for r in rows {
                    let mut v = match &r.stats {
                        Some(st) => cell(st, &r.unit),
                        None => "—".into(),
                    };
                    if let Some(n) = &r.note {
                        v.push_str(&format!(" ({n})"));
                    }
                    out.push_str(&format!("| {} | {} | {} |\n", r.measure, r.system, v));
                }
                out.push('\n');
            }
            for (ns, text) in &self.notes {
                if ns == s {
                    out.push_str(&format!("{text}\n\n"));
                }
            }
        }
        out
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// Per-run ratios `a[i] / b[i]` of two interleaved series (the runs pair
/// up, since both were measured in the same round).
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(_, d)| **d > 0.0)
        .map(|(n, d)| n / d)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_min_max() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Stats::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert!(Stats::of(&[]).is_none());
        assert!(Stats::of(&[f64::NAN]).is_none());
        assert_eq!(Stats::of(&[f64::NAN, 5.0]).unwrap().n, 1);
    }

    #[test]
    fn cells_and_numbers() {
        let s = Stats::of(&[2310.4, 2250.0, 2400.9]).unwrap();
        assert_eq!(cell(&s, "ms"), "2310 (2250–2401) ms");
        assert_eq!(cell(&Stats::of(&[1.234]).unwrap(), "×"), "1.23×");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(ratios(&[4.0, 9.0, 1.0], &[2.0, 3.0, 0.0]), vec![2.0, 3.0]);
    }

    #[test]
    fn markdown_and_json_carry_every_row() {
        let mut r = Report::new(Header {
            date: "2026-11-29".into(),
            cpu: "Fake CPU".into(),
            cores: 2,
            runs: 3,
            ..Default::default()
        });
        r.add(
            "start",
            "cocoon run -- true",
            "cocoon q35",
            "ms",
            vec![3000.0, 2900.0, 3100.0],
        );
        r.add_noted(
            "start",
            "ctr run",
            "runc",
            "ms",
            vec![],
            "failed: no containerd",
        );
        r.note("files", "virtiofsd cache: auto");
        let md = r.markdown();
        assert!(md.contains("Fake CPU, 2 cores"), "{md}");
        assert!(md.contains("### start"), "{md}");
        assert!(
            md.contains("| cocoon run -- true | cocoon q35 | 3000 (2900–3100) ms |"),
            "{md}"
        );
        assert!(
            md.contains("| ctr run | runc | — (failed: no containerd) |"),
            "{md}"
        );
        assert!(md.contains("### files\n\nvirtiofsd cache: auto"), "{md}");
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["rows"][0]["stats"]["median"], 3000.0);
        assert_eq!(v["rows"][1]["stats"], serde_json::Value::Null);
        assert_eq!(v["header"]["cores"], 2);
    }
}
