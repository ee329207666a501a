//! `linux.cgroupsPath` of a sandbox's OCI spec, parsed into the
//! directories it names below the root of every cgroup hierarchy.
//!
//! Two spellings reach a runtime (containerd's CRI writes one or the other
//! depending on the kubelet's cgroup driver):
//!
//! - cgroupfs: `/kubepods/besteffort/pod<uid>/<sandbox id>`. A path
//!   without the leading `/` is taken from the root as well (the OCI spec
//!   leaves relative paths to the runtime).
//! - systemd: `slice:prefix:name`, e.g.
//!   `kubepods-besteffort-pod<uid>.slice:cri-containerd:<sandbox id>`.
//!   Cocoon does not ask systemd for a unit (see [`super`]): the path is
//!   expanded the way runc's and Kata's systemd drivers lay out the
//!   cgroupfs tree, each `-` of a slice name a level down
//!   (`a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`) and the leaf the
//!   scope `prefix-name.scope`.
//!
//! Every component is checked: no `.` or `..`, no `/` inside a systemd
//! field, no control character, at most `NAME_MAX` bytes. The value comes
//! from containerd, never from the guest, but a bad one must not make
//! Cocoon create or remove a directory outside the hierarchy.

use std::fmt;

/// The longest directory name the kernel accepts.
const NAME_MAX: usize = 255;

/// The key the value came from, for error messages.
pub const KEY: &str = "linux.cgroupsPath";

/// A validated cgroup path: directory names from the hierarchy root down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPath(Vec<String>);

/// Why a `linux.cgroupsPath` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{KEY} {value:?}: {reason}")]
pub struct InvalidCgroupPath {
    pub value: String,
    pub reason: String,
}

impl From<InvalidCgroupPath> for cocoon_protocols::Error {
    fn from(e: InvalidCgroupPath) -> Self {
        cocoon_protocols::Error::InvalidArgument(e.to_string())
    }
}

impl CgroupPath {
    /// Parses a `linux.cgroupsPath` value in either spelling.
    pub fn parse(value: &str) -> Result<Self, InvalidCgroupPath> {
        let invalid = |reason: String| InvalidCgroupPath {
            value: value.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(invalid("empty".into()));
        }
        let components = match systemd_fields(value) {
            Some((slice, prefix, name)) => expand_systemd(slice, prefix, name).map_err(invalid)?,
            None => value
                .split('/')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect(),
        };
        if components.is_empty() {
            return Err(invalid(
                "names the root cgroup, which is not the pod's".into(),
            ));
        }
        for c in &components {
            check_component(c).map_err(|why| invalid(format!("component {c:?}: {why}")))?;
        }
        Ok(Self(components))
    }

    /// The directory names, from the hierarchy root down.
    pub fn components(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for CgroupPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.0 {
            write!(f, "/{c}")?;
        }
        Ok(())
    }
}

/// `slice:prefix:name` if `value` is in systemd's spelling: three fields,
/// the first a slice (or empty, for the default slice), as Kata tells the
/// two apart. A cgroupfs path starts with `/`.
fn systemd_fields(value: &str) -> Option<(&str, &str, &str)> {
    if value.starts_with('/') {
        return None;
    }
    let mut f = value.split(':');
    let (slice, prefix, name) = (f.next()?, f.next()?, f.next()?);
    if f.next().is_some() || !(slice.is_empty() || slice.ends_with(".slice")) {
        return None;
    }
    Some((slice, prefix, name))
}

/// The cgroupfs directories of systemd's `slice:prefix:name` (runc's
/// `ExpandSlice` and unit naming).
fn expand_systemd(slice: &str, prefix: &str, name: &str) -> Result<Vec<String>, String> {
    // runc's default, for a path with no slice.
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    for (what, field) in [("slice", slice), ("prefix", prefix), ("name", name)] {
        if field.contains('/') {
            return Err(format!("{what} {field:?} contains '/'"));
        }
        if field == "." || field == ".." {
            return Err(format!(
                "{what} {field:?}: relative components are not allowed"
            ));
        }
    }
    let mut out = expand_slice(slice)?;
    if name.is_empty() {
        return Err("the unit name (the third field) is empty".into());
    }
    // A name that is a slice is a slice of its own below the parent;
    // anything else runs in a scope.
    out.push(if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    });
    Ok(out)
}

/// `a-b-c.slice` → `a.slice`, `a-b.slice`, `a-b-c.slice`; `-.slice` is
/// the root.
fn expand_slice(slice: &str) -> Result<Vec<String>, String> {
    const SUFFIX: &str = ".slice";
    let bad = || format!("invalid slice name {slice:?}");
    let stem = slice
        .strip_suffix(SUFFIX)
        .filter(|s| !s.is_empty())
        .ok_or_else(bad)?;
    if stem == "-" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut prefix = String::new();
    for part in stem.split('-') {
        // `a--b.slice` and `-a.slice` are not slice names.
        if part.is_empty() {
            return Err(bad());
        }
        out.push(format!("{prefix}{part}{SUFFIX}"));
        prefix.push_str(part);
        prefix.push('-');
    }
    Ok(out)
}

fn check_component(c: &str) -> Result<(), &'static str> {
    if c == "." || c == ".." {
        return Err("relative components are not allowed");
    }
    if c.is_empty() {
        return Err("empty");
    }
    if c.contains('/') {
        return Err("contains '/'");
    }
    if c.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if c.len() > NAME_MAX {
        return Err("longer than a directory name can be");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(v: &str) -> Vec<String> {
        CgroupPath::parse(v)
            .unwrap_or_else(|e| panic!("{v}: {e}"))
            .components()
            .to_vec()
    }

    #[test]
    fn cgroupfs_paths() {
        assert_eq!(
            parts("/kubepods/besteffort/podabc/0123abcd"),
            ["kubepods", "besteffort", "podabc", "0123abcd"]
        );
        // Doubled and trailing slashes mean nothing; relative is from the root.
        assert_eq!(parts("//kubepods//pod1/"), ["kubepods", "pod1"]);
        assert_eq!(parts("kubepods/pod1/x"), ["kubepods", "pod1", "x"]);
        let p = CgroupPath::parse("/a/b").unwrap();
        assert_eq!(p.to_string(), "/a/b");
        // `:` is an ordinary character of a cgroupfs path.
        assert_eq!(parts("/a:b:c"), ["a:b:c"]);
    }

    #[test]
    fn systemd_paths_expand_as_runc_lays_them_out() {
        assert_eq!(
            parts("kubepods-besteffort-pod1234.slice:cri-containerd:0123abcd"),
            [
                "kubepods.slice",
                "kubepods-besteffort.slice",
                "kubepods-besteffort-pod1234.slice",
                "cri-containerd-0123abcd.scope"
            ]
        );
        assert_eq!(
            parts("system.slice:docker:abc"),
            ["system.slice", "docker-abc.scope"]
        );
        assert_eq!(parts("-.slice:p:abc"), ["p-abc.scope"]);
        assert_eq!(parts(":p:abc"), ["system.slice", "p-abc.scope"]);
        assert_eq!(parts("a.slice::abc"), ["a.slice", "abc.scope"]);
        assert_eq!(
            parts("a-b.slice:p:c.slice"),
            ["a.slice", "a-b.slice", "c.slice"]
        );
        // Not systemd's spelling: a cgroupfs name with colons.
        assert_eq!(parts("x:y:z"), ["x:y:z"]);
    }

    #[test]
    fn bad_paths_name_the_key_and_why() {
        for (value, why) in [
            ("", "empty"),
            ("/", "root cgroup"),
            ("///", "root cgroup"),
            ("/kubepods/../etc", "relative components"),
            ("/kubepods/./x", "relative components"),
            ("..", "relative components"),
            ("a/../../b", "relative components"),
            ("/a/b\nc", "control character"),
            ("/a/b\0c", "control character"),
            ("a--b.slice:p:x", "invalid slice name"),
            ("-a.slice:p:x", "invalid slice name"),
            (".slice:p:x", "invalid slice name"),
            ("a.slice:p:", "unit name"),
            ("a.slice:p:../x", "contains '/'"),
            ("a.slice:../p:x", "contains '/'"),
            ("a.slice:p:..", "relative components"),
        ] {
            let e = CgroupPath::parse(value).expect_err(value);
            let msg = e.to_string();
            assert!(msg.starts_with("linux.cgroupsPath "), "{msg}");
            assert!(msg.contains(why), "{value:?}: {msg}");
            assert!(matches!(
                cocoon_protocols::Error::from(e),
                cocoon_protocols::Error::InvalidArgument(_)
            ));
        }
        let long = format!("/a/{}", "x".repeat(256));
        assert!(CgroupPath::parse(&long).is_err());
        assert!(CgroupPath::parse(&format!("/a/{}", "x".repeat(255))).is_ok());
    }
}
