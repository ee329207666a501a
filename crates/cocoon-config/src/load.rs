//! Load order: the task's `ConfigPath` → `$COCOON_CONF_FILE` →
//! `/etc/cocoon/configuration.toml` → `/usr/share/defaults/cocoon/configuration.toml`
//! → built-in defaults. A file that is named (by the caller or the
//! environment) must load; the default paths are used only if they exist.

use std::path::{Path, PathBuf};

use crate::schema::RawConfig;
use crate::{Config, ConfigError};

/// Environment variable naming a configuration file.
pub const ENV_CONF_FILE: &str = "COCOON_CONF_FILE";

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Named by the caller (the `ConfigPath` runtime option or `--config`).
    Explicit(PathBuf),
    /// Named by `$COCOON_CONF_FILE`.
    Env(PathBuf),
    /// Found at one of the default paths.
    Default(PathBuf),
    /// No file: built-in defaults.
    BuiltIn,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Explicit(p) => write!(f, "{} (named explicitly)", p.display()),
            Source::Env(p) => write!(f, "{} (from ${ENV_CONF_FILE})", p.display()),
            Source::Default(p) => write!(f, "{} (default path)", p.display()),
            Source::BuiltIn => f.write_str("built-in defaults (no configuration file found)"),
        }
    }
}

/// A resolved configuration and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub source: Source,
}

/// The default paths, in order.
pub fn default_search_paths() -> [&'static Path; 2] {
    [
        Path::new("/etc/cocoon/configuration.toml"),
        Path::new("/usr/share/defaults/cocoon/configuration.toml"),
    ]
}

/// Resolves the configuration by the load order. `explicit` is the task's
/// `ConfigPath` (or the CLI's `--config`).
pub fn load(explicit: Option<&Path>) -> Result<Loaded, ConfigError> {
    let env = std::env::var_os(ENV_CONF_FILE)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    load_with(explicit, env.as_deref(), &default_search_paths())
}

pub(crate) fn load_with(
    explicit: Option<&Path>,
    env: Option<&Path>,
    defaults: &[&Path],
) -> Result<Loaded, ConfigError> {
    if let Some(p) = explicit {
        return Ok(Loaded {
            config: load_file(p)?,
            source: Source::Explicit(p.into()),
        });
    }
    if let Some(p) = env {
        return Ok(Loaded {
            config: load_file(p)?,
            source: Source::Env(p.into()),
        });
    }
    for p in defaults {
        if p.exists() {
            return Ok(Loaded {
                config: load_file(p)?,
                source: Source::Default(p.to_path_buf()),
            });
        }
    }
    Ok(Loaded {
        config: Config::default(),
        source: Source::BuiltIn,
    })
}

/// Loads and validates one file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(path, &text)
}

pub(crate) fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(1);
        ConfigError::Parse {
            path: path.into(),
            line,
            key: unknown_key(e.message()),
            message: e.message().trim().to_string(),
        }
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    raw.validate(base).map_err(|inv| ConfigError::Invalid {
        path: path.into(),
        line: key_line(text, inv.key).unwrap_or(1),
        key: inv.key.to_string(),
        message: inv.message,
    })
}

/// `unknown field `foo`, expected ...` names the key; surface it.
fn unknown_key(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The line of a dotted key such as `hypervisor.vcpus`, if the file has it.
fn key_line(text: &str, dotted: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(text).ok()?;
    let mut item = doc.as_item();
    for part in dotted.split('.') {
        item = item.get(part)?;
    }
    let (table, key) = dotted.rsplit_once('.')?;
    let parent = table.split('.').try_fold(doc.as_item(), |i, p| i.get(p))?;
    let span = parent
        .as_table_like()
        .and_then(|t| t.get_key_value(key))
        .and_then(|(k, _)| k.span())
        .or_else(|| item.span())?;
    Some(line_of(text, span.start))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Accel, Machine};

    fn p() -> &'static Path {
        Path::new("/cfg/flavour.toml")
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse(p(), "").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read_and_paths_resolved() {
        let c = parse(
            p(),
            "[hypervisor]\naccel = \"tcg\"\nmachine = \"microvm\"\nvcpus = 2\nmemory_mib = 1024\n\
             [guest]\ndir = \"img\"\n",
        )
        .unwrap();
        assert_eq!(c.hypervisor.accel, Accel::Tcg);
        assert_eq!(c.hypervisor.machine, Machine::Microvm);
        assert_eq!(c.hypervisor.vcpus, 2);
        assert_eq!(c.hypervisor.memory_mib, 1024);
        assert_eq!(
            c.guest.kernel,
            Path::new("/cfg/img/vmlinux"),
            "microvm boots PVH"
        );
        assert_eq!(c.guest.initrd, Path::new("/cfg/img/initrd.img"));
        let q = parse(p(), "[guest]\ndir = \"img\"\n").unwrap();
        assert_eq!(q.guest.kernel, Path::new("/cfg/img/vmlinuz"));
    }

    #[test]
    fn malformed_toml_names_file_and_line() {
        let err = parse(p(), "[hypervisor]\nvcpus = 2\nmemory_mib = = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/cfg/flavour.toml:3:"), "{msg}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(p(), "[hypervisor]\nvcpus = 2\nmemroy = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/cfg/flavour.toml:3:"), "{msg}");
        assert!(msg.contains("`memroy`"), "{msg}");
    }

    #[test]
    fn wrong_enum_value_is_an_error() {
        let err = parse(p(), "[hypervisor]\n\naccel = \"xen\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":3:") && err.contains("xen"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_key_and_line() {
        let err = parse(p(), "[hypervisor]\nvcpus = 1\n\nmemory_mib = 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/cfg/flavour.toml:4:"), "{msg}");
        assert!(msg.contains("`hypervisor.memory_mib`"), "{msg}");
    }

    #[test]
    fn ceilings_are_read_and_checked() {
        let c = parse(
            p(),
            "[hypervisor]\nvcpus = 2\nmemory_mib = 1024\nmax_vcpus = 6\nmax_memory_mib = 8192\n",
        )
        .unwrap();
        assert_eq!(
            (c.hypervisor.max_vcpus, c.hypervisor.max_memory_mib),
            (6, 8192)
        );
        // Defaults: the host's size, capped, and never below the boot size.
        let host = crate::HostSize::probe();
        let c = parse(p(), "[hypervisor]\nvcpus = 40\nmemory_mib = 512\n").unwrap();
        assert_eq!(c.hypervisor.max_vcpus, 40);
        assert_eq!(
            c.hypervisor.max_memory_mib,
            host.default_max_memory_mib().max(512)
        );
        assert!(c.hypervisor.max_memory_mib <= crate::DEFAULT_MAX_MEMORY_MIB_CAP);
        for (text, line, key) in [
            (
                "[hypervisor]\nvcpus = 2\n\nmax_vcpus = 1\n",
                4,
                "hypervisor.max_vcpus",
            ),
            ("[hypervisor]\nmax_vcpus = 256\n", 2, "hypervisor.max_vcpus"),
            (
                "[hypervisor]\nmemory_mib = 1024\nmax_memory_mib = 512\n",
                3,
                "hypervisor.max_memory_mib",
            ),
            // microvm cannot hotplug memory: its ceiling is its size.
            (
                "[hypervisor]\nmachine = \"microvm\"\nmax_memory_mib = 4096\n",
                3,
                "hypervisor.max_memory_mib",
            ),
        ] {
            let msg = parse(p(), text).unwrap_err().to_string();
            assert!(
                msg.starts_with(&format!(
                    "/cfg/flavour.toml:{line}: invalid value for `{key}`"
                )),
                "{text}: {msg}"
            );
        }
        let m = parse(
            p(),
            "[hypervisor]\nmachine = \"microvm\"\nmemory_mib = 768\n",
        )
        .unwrap();
        assert_eq!(m.hypervisor.max_memory_mib, 768);
        let m = parse(
            p(),
            "[hypervisor]\nmachine = \"microvm\"\nmemory_mib = 768\nmax_memory_mib = 768\n",
        )
        .unwrap();
        assert_eq!(m.hypervisor.max_memory_mib, 768);
    }

    #[test]
    fn explicit_path_wins_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        let b = dir.path().join("b.toml");
        std::fs::write(&a, "[hypervisor]\nvcpus = 2\n").unwrap();
        std::fs::write(&b, "[hypervisor]\nvcpus = 3\n").unwrap();
        let l = load_with(Some(&a), Some(&b), &[]).unwrap();
        assert_eq!(l.config.hypervisor.vcpus, 2);
        assert_eq!(l.source, Source::Explicit(a.clone()));
        let l = load_with(None, Some(&b), &[&a]).unwrap();
        assert_eq!(l.config.hypervisor.vcpus, 3);
        let l = load_with(None, None, &[&dir.path().join("none.toml"), &a]).unwrap();
        assert_eq!(l.source, Source::Default(a.clone()));
        let missing = dir.path().join("missing.toml");
        let err = load_with(Some(&missing), None, &[&a]).unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
        let l = load_with(None, None, &[&missing]).unwrap();
        assert_eq!(l.source, Source::BuiltIn);
    }

    #[test]
    fn shipped_flavours_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "toml") {
                load_file(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(
            n >= 3,
            "expected at least q35, microvm and tcg flavours in {}",
            dir.display()
        );
        let m = load_file(&dir.join("microvm.toml")).unwrap();
        assert_eq!(m.hypervisor.machine, Machine::Microvm);
        assert!(m.hypervisor.max_vcpus >= 4);
        for q in ["q35.toml", "q35-tcg.toml"] {
            let h = load_file(&dir.join(q)).unwrap().hypervisor;
            assert!(h.max_vcpus >= 4 && h.max_memory_mib >= 4096, "{q}: {h:?}");
        }
    }
}
