//! This process's mount points, from `/proc/self/mountinfo`.
//!
//! The kernel escapes space, tab, newline and backslash in paths there as
//! octal (`\040`, `\011`, `\012`, `\134`); they are decoded, so a state
//! directory whose path has a space is still found.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};

/// Every mount point, in mount order (a path appears once per mount
/// stacked on it).
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    Ok(parse(&std::fs::read("/proc/self/mountinfo")?))
}

/// The mount points strictly below `dir`, as paths relative to it.
/// `dir` must be spelled as the kernel spells it (see
/// [`super::safe_fs::kernel_path`]).
pub fn below(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(mount_points()?
        .into_iter()
        .filter_map(|m| {
            let rel = m.strip_prefix(dir).ok()?;
            (!rel.as_os_str().is_empty()).then(|| rel.to_path_buf())
        })
        .collect())
}

/// The number of components of a relative path.
pub fn depth(rel: &Path) -> usize {
    rel.components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count()
}

/// One line of `/proc/self/mountinfo`, as far as Cocoon reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The `major:minor` of the mounted file system: mounts of one cgroup
    /// hierarchy share it.
    pub dev: String,
    /// The directory of the file system mounted here (`/` for its root).
    pub root: PathBuf,
    pub point: PathBuf,
    pub fstype: String,
    /// The file system's own options (a cgroup v1 hierarchy's controllers).
    pub super_options: String,
}

/// Every mount, in mount order.
pub fn entries() -> io::Result<Vec<Entry>> {
    Ok(parse_entries(&std::fs::read("/proc/self/mountinfo")?))
}

fn parse_entries(text: &[u8]) -> Vec<Entry> {
    let path = |f: &[u8]| PathBuf::from(OsString::from_vec(unescape(f)));
    let text_of = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            // id, parent id, major:minor, root, mount point, options,
            // optional fields..., "-", fstype, source, super options
            let sep = fields.iter().position(|f| *f == b"-")?;
            if sep < 6 {
                return None;
            }
            Some(Entry {
                dev: text_of(fields[2]),
                root: path(fields[3]),
                point: path(fields[4]),
                fstype: text_of(fields.get(sep + 1)?),
                super_options: text_of(fields.get(sep + 3)?),
            })
        })
        .collect()
}

fn parse(text: &[u8]) -> Vec<PathBuf> {
    text.split(|&b| b == b'\n')
        // id, parent id, major:minor, root, mount point, ...
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(OsString::from_vec(unescape(field))))
        .collect()
}

fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| {
            field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_the_kernels_octal_escapes() {
        let text = b"22 27 0:21 / /proc rw,relatime - proc proc rw\n\
            90 27 0:50 / /tmp/a\\040b\\011c\\134d\\012e rw - tmpfs tmpfs rw\n\
            91 27 0:51 / /tmp/not\\9escape\\04 rw - tmpfs tmpfs rw\n";
        assert_eq!(
            parse(text),
            vec![
                PathBuf::from("/proc"),
                PathBuf::from("/tmp/a b\tc\\d\ne"),
                PathBuf::from("/tmp/not\\9escape\\04"),
            ]
        );
    }

    #[test]
    fn entries_carry_type_root_and_super_options() {
        let text = b"35 25 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:16 - cgroup cgroup rw,memory\n\
            36 25 0:31 / /sys/fs/cgroup/unified rw master:2 shared:9 - cgroup2 cgroup2 rw,nsdelegate\n\
            90 27 0:30 /kubepods /mnt/a\\040b rw - cgroup cgroup rw,memory\n\
            garbage line\n";
        let e = parse_entries(text);
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            Entry {
                dev: "0:30".into(),
                root: "/".into(),
                point: "/sys/fs/cgroup/memory".into(),
                fstype: "cgroup".into(),
                super_options: "rw,memory".into(),
            }
        );
        assert_eq!(e[1].fstype, "cgroup2");
        assert_eq!(e[1].super_options, "rw,nsdelegate");
        assert_eq!(e[2].root, PathBuf::from("/kubepods"));
        assert_eq!(e[2].point, PathBuf::from("/mnt/a b"));
    }

    #[test]
    fn depth_counts_components() {
        assert_eq!(depth(Path::new("mounts")), 1);
        assert_eq!(depth(Path::new("mounts/c1/rootfs")), 3);
    }
}
