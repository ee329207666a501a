//! Cocoon's configuration: one TOML file per VM flavour.
//!
//! A file is first parsed into [`RawConfig`] (every field optional, unknown
//! keys rejected), then validated into [`Config`], whose fields are all
//! resolved. Defaults live in one place: the `Default` impls of the resolved
//! types. Errors name the file, the line and the key at fault.

mod load;
mod render;
mod schema;

pub use load::{default_search_paths, load, load_file, Loaded, Source, ENV_CONF_FILE};
pub use schema::{
    Accel, Config, GuestConfig, HostSize, HypervisorConfig, Machine, RuntimeConfig, VirtiofsConfig,
    VsockConfig, VsockTransport, DEFAULT_MAX_MEMORY_MIB_CAP, DEFAULT_MAX_VCPUS_CAP,
};

/// The unit memory is hotplugged in: the guest kernel's memory block on
/// x86-64 (128 MiB for guests under 64 GiB).
pub const HOTPLUG_BLOCK_MIB: u32 = 128;

use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: invalid TOML{}: {message}", key.as_ref().map(|k| format!(" at key `{k}`")).unwrap_or_default())]
    Parse {
        path: PathBuf,
        line: usize,
        key: Option<String>,
        message: String,
    },
    #[error("{path}:{line}: invalid value for `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}
