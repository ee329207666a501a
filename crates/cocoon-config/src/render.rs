//! A resolved [`Config`] written back as TOML: what `cocoon env` prints,
//! and a file that loads as the same flavour.

use std::fmt::Write;
use std::path::Path;

use crate::schema::{Accel, Config, Machine, VsockTransport};

impl Accel {
    /// The name the file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl Machine {
    /// The name the file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }
}

impl VsockTransport {
    /// The name the file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            VsockTransport::Auto => "auto",
            VsockTransport::Vhost => "vhost",
            VsockTransport::Hybrid => "hybrid",
        }
    }
}

/// A TOML basic string (quotes and escapes as TOML wants them).
fn string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn path(p: &Path) -> String {
    string(&p.to_string_lossy())
}

impl Config {
    /// The configuration as a TOML file that loads back to it. `note`
    /// adds a comment after a key (`section.key` → text), e.g. what `auto`
    /// resolves to on this host. Paths that are not UTF-8 are written
    /// lossily.
    pub fn to_toml(&self, note: impl Fn(&str) -> Option<String>) -> String {
        let (h, g) = (&self.hypervisor, &self.guest);
        let sections: [(&str, Vec<(&str, String)>); 5] = [
            (
                "hypervisor",
                vec![
                    ("path", path(&h.path)),
                    ("accel", string(h.accel.as_str())),
                    ("machine", string(h.machine.as_str())),
                    ("vcpus", h.vcpus.to_string()),
                    ("memory_mib", h.memory_mib.to_string()),
                    ("max_vcpus", h.max_vcpus.to_string()),
                    ("max_memory_mib", h.max_memory_mib.to_string()),
                    ("kernel_params", string(&h.kernel_params)),
                    (
                        "boot_timeout_secs",
                        format!("{:?}", h.boot_timeout.as_secs_f64()),
                    ),
                ],
            ),
            (
                "guest",
                vec![
                    ("dir", path(&g.dir)),
                    ("kernel", path(&g.kernel)),
                    ("initrd", path(&g.initrd)),
                ],
            ),
            (
                "virtiofs",
                vec![
                    ("path", path(&self.virtiofs.path)),
                    ("cache", string(&self.virtiofs.cache)),
                ],
            ),
            (
                "vsock",
                vec![
                    ("transport", string(self.vsock.transport.as_str())),
                    ("backend_path", path(&self.vsock.backend_path)),
                ],
            ),
            (
                "runtime",
                vec![("state_dir", path(&self.runtime.state_dir))],
            ),
        ];
        let mut out = String::new();
        for (i, (section, keys)) in sections.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let _ = writeln!(out, "[{section}]");
            for (key, value) in keys {
                let _ = write!(out, "{key} = {value}");
                if let Some(n) = note(&format!("{section}.{key}")) {
                    let _ = write!(out, "  # {n}");
                }
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_printed_loads_back_as_the_same_flavour() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.hypervisor.accel = Accel::Tcg;
        c.hypervisor.machine = Machine::Microvm;
        c.hypervisor.vcpus = 3;
        c.hypervisor.memory_mib = 768;
        c.hypervisor.max_vcpus = 5;
        // microvm: no memory growth, the ceiling is the size.
        c.hypervisor.max_memory_mib = 768;
        c.hypervisor.kernel_params = "quiet \"x\"\\y".into();
        c.hypervisor.boot_timeout = std::time::Duration::from_millis(12_500);
        c.guest.dir = dir.path().join("guest dir");
        c.guest.kernel = c.guest.dir.join("vmlinux");
        c.guest.initrd = c.guest.dir.join("initrd.img");
        c.virtiofs.cache = "never".into();
        c.vsock.transport = VsockTransport::Hybrid;
        c.runtime.state_dir = "/run/cocoon-test".into();
        let text = c.to_toml(|key| (key == "hypervisor.accel").then(|| "a note".into()));
        assert!(text.contains("accel = \"tcg\"  # a note\n"), "{text}");
        let file = dir.path().join("flavour.toml");
        std::fs::write(&file, &text).unwrap();
        let back = crate::load_file(&file).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back, c, "{text}");
        assert!(text.contains("max_vcpus = 5\n"), "{text}");
        assert!(text.contains("max_memory_mib = 768\n"), "{text}");
        // A q35 flavour with room to grow.
        c.hypervisor.machine = Machine::Q35;
        c.hypervisor.max_memory_mib = 4096;
        let text = c.to_toml(|_| None);
        std::fs::write(&file, &text).unwrap();
        assert_eq!(crate::load_file(&file).unwrap(), c, "{text}");
        // The defaults too.
        let d = Config::default();
        std::fs::write(&file, d.to_toml(|_| None)).unwrap();
        assert_eq!(crate::load_file(&file).unwrap(), d);
    }
}
