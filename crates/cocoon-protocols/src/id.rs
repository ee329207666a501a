//! [`Id`]: a sandbox, container or exec id, checked once at the edge
//! before it reaches a host path, a QEMU option or a guest path.
//!
//! The rule is containerd's identifier grammar, bounded: an ASCII letter or
//! digit, then letters, digits, `.`, `_` and `-`, at most [`Id::MAX_LEN`]
//! characters, never two dots in a row. So an id is always one path
//! component (no `/`, never `.` or `..`), never a QEMU option separator
//! (`,`, `=`), never a command-line flag (leading `-`), never carries
//! whitespace or control characters (log and stream-header framing).

use std::fmt;

/// What an id names, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Sandbox,
    Container,
    Exec,
}

impl IdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdKind::Sandbox => "sandbox",
            IdKind::Container => "container",
            IdKind::Exec => "exec",
        }
    }
}

/// A validated id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

/// Why a string is not an [`Id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {} id {}: {reason}", kind.as_str(), shown(id))]
pub struct InvalidId {
    pub kind: IdKind,
    pub id: String,
    pub reason: &'static str,
}

/// The id as quoted in messages: escaped, and cut short if long.
fn shown(id: &str) -> String {
    const SHOW: usize = 80;
    if id.chars().count() > SHOW {
        let head: String = id.chars().take(SHOW).collect();
        format!("{head:?}... ({} bytes)", id.len())
    } else {
        format!("{id:?}")
    }
}

impl Id {
    /// The longest id accepted (CRI ids are 64 hex digits).
    pub const MAX_LEN: usize = 128;

    /// Checks `s` as an id of `kind`.
    pub fn new(kind: IdKind, s: &str) -> Result<Self, InvalidId> {
        let bad = |reason| {
            Err(InvalidId {
                kind,
                id: s.to_string(),
                reason,
            })
        };
        if s.is_empty() {
            return bad("empty");
        }
        if s.len() > Self::MAX_LEN {
            return bad("longer than 128 characters");
        }
        if !s.as_bytes()[0].is_ascii_alphanumeric() {
            return bad("must start with a letter or digit");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return bad("only letters, digits, '.', '_' and '-' are allowed");
        }
        if s.contains("..") {
            return bad("'..' is not allowed");
        }
        Ok(Self(s.to_string()))
    }

    pub fn sandbox(s: &str) -> Result<Self, InvalidId> {
        Self::new(IdKind::Sandbox, s)
    }

    pub fn container(s: &str) -> Result<Self, InvalidId> {
        Self::new(IdKind::Container, s)
    }

    pub fn exec(s: &str) -> Result<Self, InvalidId> {
        Self::new(IdKind::Exec, s)
    }

    /// An exec id, where empty means "the container's init".
    pub fn exec_or_init(s: &str) -> Result<Option<Self>, InvalidId> {
        if s.is_empty() {
            Ok(None)
        } else {
            Self::exec(s).map(Some)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for Id {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&self.0)
    }
}

impl std::ops::Deref for Id {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<Id> for String {
    fn from(id: Id) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_containerd_and_cri_ids() {
        for ok in [
            "a",
            "c1",
            "my-container_1.2",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            &"x".repeat(Id::MAX_LEN),
        ] {
            assert_eq!(Id::container(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_what_could_escape_a_path_or_an_option() {
        let long = "a".repeat(300);
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "only letters"),
            ("/etc", "must start"),
            ("..", "must start"),
            ("a..b", "'..'"),
            (".hidden", "must start"),
            ("-name", "must start"),
            ("a,b", "only letters"),
            ("a=b", "only letters"),
            ("a b", "only letters"),
            ("a\0b", "only letters"),
            ("a\nb", "only letters"),
            ("é", "must start"),
            (long.as_str(), "longer than 128"),
        ] {
            let e = Id::exec(bad).unwrap_err();
            assert!(e.reason.contains(why), "{bad:?}: {e}");
            assert_eq!(e.kind, IdKind::Exec);
        }
    }

    #[test]
    fn messages_name_the_kind_and_stay_short() {
        let e = Id::sandbox(&"a".repeat(300)).unwrap_err().to_string();
        assert!(e.starts_with("invalid sandbox id \"aaaa"), "{e}");
        assert!(e.contains("(300 bytes)"), "{e}");
        assert!(e.len() < 200, "{e}");
        let e = Id::container("a/b").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid container id \"a/b\": only letters, digits, '.', '_' and '-' are allowed"
        );
        assert_eq!(Id::exec_or_init("").unwrap(), None);
    }
}
