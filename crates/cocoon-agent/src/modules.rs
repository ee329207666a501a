//! Kernel modules: the image lists them in load order (dependencies first);
//! the agent loads each with `finit_module(2)`, passing parameters given on
//! the kernel command line as `<module>.<param>=<value>`.

use std::ffi::CString;
use std::path::Path;

/// Where the image keeps the modules (and their list).
pub const DIR: &str = "/lib/modules";

/// The image's list of modules, one path per line, in load order.
pub const ORDER_FILE: &str = "/lib/modules/cocoon.load";

/// Parameters for `module` from the kernel command line (`-` and `_` alike).
pub fn params_for(module: &str, cmdline: &str) -> String {
    let norm = |s: &str| s.replace('-', "_");
    let prefix = format!("{}.", norm(module));
    cmdline
        .split_whitespace()
        .filter_map(|w| {
            let (name, rest) = w.split_once('.')?;
            let _ = rest;
            norm(name)
                .eq(&prefix[..prefix.len() - 1])
                .then(|| w[name.len() + 1..].to_string())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Loads every module listed in `order_file`. A failure is logged, not fatal:
/// a missing optional driver should not stop the guest.
pub fn load_listed(order_file: &Path, cmdline: &str) {
    let list = match std::fs::read_to_string(order_file) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("no module list at {}: {e}", order_file.display());
            return;
        }
    };
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .unwrap_or(path);
        if let Err(e) = load(Path::new(path), &params_for(name, cmdline)) {
            tracing::warn!("load module {path}: {e}");
        }
    }
}

fn load(path: &Path, params: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = CString::new(params).map_err(std::io::Error::other)?;
    match nix::kmod::finit_module(&file, &params, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_params_come_from_cmdline() {
        let cmdline =
            "console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 virtio-mmio.device=4K@0x1:5 quiet";
        assert_eq!(
            params_for("virtio_mmio", cmdline),
            "device=512@0xfeb00e00:12 device=4K@0x1:5"
        );
        assert_eq!(params_for("virtio_pci", cmdline), "");
    }
}
