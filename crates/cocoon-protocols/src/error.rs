//! [`Error`]: one error type for both sides of the protocol, whose variants
//! are gRPC codes. The agent answers with it, the runtime keeps the agent's
//! code when it passes an error on, and the shim gives containerd the same
//! code: a failure is never flattened to "unknown".

use crate::id::InvalidId;

/// An error with the gRPC code the caller should see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    /// A call did not finish within its deadline.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The peer is gone (the VM died, the connection closed).
    #[error("{0}")]
    Unavailable(String),
    /// A bound was hit (a size, a count).
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The most of a peer's error message that is passed on.
pub const MAX_PEER_MESSAGE: usize = 1024;

/// Text from the guest made fit for a log line or an error message: at most
/// about `max` bytes (the head and the tail, where the cause usually is),
/// control characters (line breaks, terminal escapes) escaped, so that a
/// guest can neither forge log lines nor grow them without bound.
pub fn peer_text(s: &str, max: usize) -> String {
    let escaped: String = s
        .chars()
        .flat_map(|c| {
            let e: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            e
        })
        .collect();
    if escaped.len() <= max {
        return escaped;
    }
    let mut head = max / 2;
    while !escaped.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = escaped.len() - max / 2;
    while !escaped.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} [{} bytes cut] {}",
        &escaped[..head],
        tail - head,
        &escaped[tail..]
    )
}

impl Error {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::DeadlineExceeded(_) => ttrpc::Code::DEADLINE_EXCEEDED,
            Error::Unavailable(_) => ttrpc::Code::UNAVAILABLE,
            Error::ResourceExhausted(_) => ttrpc::Code::RESOURCE_EXHAUSTED,
            Error::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }

    /// The message, without the code.
    pub fn message(&self) -> &str {
        match self {
            Error::NotFound(m)
            | Error::AlreadyExists(m)
            | Error::InvalidArgument(m)
            | Error::FailedPrecondition(m)
            | Error::Unimplemented(m)
            | Error::DeadlineExceeded(m)
            | Error::Unavailable(m)
            | Error::ResourceExhausted(m)
            | Error::Internal(m) => m,
        }
    }

    /// An error of `code` (codes this type has no variant for are Internal).
    pub fn with_code(code: ttrpc::Code, message: String) -> Self {
        match code {
            ttrpc::Code::NOT_FOUND => Error::NotFound(message),
            ttrpc::Code::ALREADY_EXISTS => Error::AlreadyExists(message),
            ttrpc::Code::INVALID_ARGUMENT => Error::InvalidArgument(message),
            ttrpc::Code::FAILED_PRECONDITION => Error::FailedPrecondition(message),
            ttrpc::Code::UNIMPLEMENTED => Error::Unimplemented(message),
            ttrpc::Code::DEADLINE_EXCEEDED => Error::DeadlineExceeded(message),
            ttrpc::Code::UNAVAILABLE => Error::Unavailable(message),
            ttrpc::Code::RESOURCE_EXHAUSTED => Error::ResourceExhausted(message),
            _ => Error::Internal(message),
        }
    }

    /// The same error with `what: ` before its message.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        let code = self.code();
        Error::with_code(code, format!("{what}: {}", self.message()))
    }

    /// The error of a ttrpc call `what`: the peer's code is kept; a closed
    /// connection is Unavailable, a timeout DeadlineExceeded.
    pub fn from_ttrpc(what: impl std::fmt::Display, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => Error::with_code(
                s.code(),
                format!("{what}: {}", peer_text(s.message(), MAX_PEER_MESSAGE)),
            ),
            ttrpc::Error::LocalClosed | ttrpc::Error::RemoteClosed => {
                Error::Unavailable(format!("{what}: the guest agent's connection is closed"))
            }
            // ttrpc has no typed timeout: its client says this.
            ttrpc::Error::Others(m) if m.starts_with("Receive packet timeout") => {
                Error::DeadlineExceeded(format!("{what}: {m}"))
            }
            other => Error::Internal(format!("{what}: {other}")),
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.message()))
    }
}

impl From<InvalidId> for Error {
    fn from(e: InvalidId) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<(Error, ttrpc::Code)> {
        let m = || "x".to_string();
        vec![
            (Error::NotFound(m()), ttrpc::Code::NOT_FOUND),
            (Error::AlreadyExists(m()), ttrpc::Code::ALREADY_EXISTS),
            (Error::InvalidArgument(m()), ttrpc::Code::INVALID_ARGUMENT),
            (
                Error::FailedPrecondition(m()),
                ttrpc::Code::FAILED_PRECONDITION,
            ),
            (Error::Unimplemented(m()), ttrpc::Code::UNIMPLEMENTED),
            (Error::DeadlineExceeded(m()), ttrpc::Code::DEADLINE_EXCEEDED),
            (Error::Unavailable(m()), ttrpc::Code::UNAVAILABLE),
            (
                Error::ResourceExhausted(m()),
                ttrpc::Code::RESOURCE_EXHAUSTED,
            ),
            (Error::Internal(m()), ttrpc::Code::INTERNAL),
        ]
    }

    #[test]
    fn every_variant_reaches_ttrpc_with_its_code() {
        for (e, code) in all() {
            match ttrpc::Error::from(e.clone()) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code, "{e:?}");
                    assert_eq!(s.message(), "x");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn codes_survive_a_round_trip_through_the_peer() {
        for (e, code) in all() {
            let back = Error::from_ttrpc("exec", ttrpc::Error::from(e));
            assert_eq!(back.code(), code);
            assert_eq!(back.message(), "exec: x");
        }
    }

    #[test]
    fn peer_messages_are_bounded_and_cannot_forge_lines() {
        let forged = format!(
            "oops\n2026-01-01 INFO forged{}: not found",
            "x".repeat(10_000)
        );
        let e = Error::from_ttrpc(
            "exec",
            ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INTERNAL, forged)),
        );
        assert!(!e.message().contains('\n'));
        assert!(e.message().starts_with("exec: oops\\n2026"));
        assert!(e.message().ends_with("xx: not found"), "the tail is kept");
        assert!(
            e.message().len() < MAX_PEER_MESSAGE + 64,
            "{}",
            e.message().len()
        );
    }

    #[test]
    fn transport_failures_get_their_codes() {
        let e = Error::from_ttrpc("start", ttrpc::Error::RemoteClosed);
        assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
        let e = Error::from_ttrpc(
            "start",
            ttrpc::Error::Others("Receive packet timeout".into()),
        );
        assert!(matches!(e, Error::DeadlineExceeded(_)), "{e:?}");
        let e = Error::from(crate::Id::exec("a/b").unwrap_err());
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert_eq!(
            Error::NotFound("c1".into()).context("state").to_string(),
            "state: c1"
        );
    }
}
