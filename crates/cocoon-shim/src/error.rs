//! The shim's errors, each variant one gRPC code.

/// A Task API error.
#[derive(Debug, thiserror::Error)]
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
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> ttrpc::Code {
        match self {
            Error::NotFound(_) => ttrpc::Code::NOT_FOUND,
            Error::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            Error::Internal(_) => ttrpc::Code::INTERNAL,
        }
    }

    /// An agent error, keeping the code the agent gave.
    pub fn from_agent(what: &str, e: ttrpc::Error) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s) => {
                let msg = format!("{what}: {}", s.message());
                match s.code() {
                    ttrpc::Code::NOT_FOUND => Error::NotFound(msg),
                    ttrpc::Code::ALREADY_EXISTS => Error::AlreadyExists(msg),
                    ttrpc::Code::INVALID_ARGUMENT => Error::InvalidArgument(msg),
                    ttrpc::Code::FAILED_PRECONDITION => Error::FailedPrecondition(msg),
                    ttrpc::Code::UNIMPLEMENTED => Error::Unimplemented(msg),
                    _ => Error::Internal(msg),
                }
            }
            other => Error::Internal(format!("{what}: {other}")),
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

impl From<cocoon_runtime::Error> for Error {
    fn from(e: cocoon_runtime::Error) -> Self {
        Error::Internal(cocoon_runtime::error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_reach_ttrpc() {
        let cases = [
            (Error::NotFound("x".into()), ttrpc::Code::NOT_FOUND),
            (
                Error::AlreadyExists("x".into()),
                ttrpc::Code::ALREADY_EXISTS,
            ),
            (
                Error::InvalidArgument("x".into()),
                ttrpc::Code::INVALID_ARGUMENT,
            ),
            (
                Error::FailedPrecondition("x".into()),
                ttrpc::Code::FAILED_PRECONDITION,
            ),
            (Error::Unimplemented("x".into()), ttrpc::Code::UNIMPLEMENTED),
            (Error::Internal("x".into()), ttrpc::Code::INTERNAL),
        ];
        for (e, code) in cases {
            match ttrpc::Error::from(e) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code);
                    assert_eq!(s.message(), "x");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn agent_codes_are_kept() {
        let e = ttrpc::Error::RpcStatus(ttrpc::get_status(
            ttrpc::Code::ALREADY_EXISTS,
            "exec e1 exists",
        ));
        let e = Error::from_agent("exec", e);
        assert!(matches!(e, Error::AlreadyExists(_)));
        assert_eq!(e.to_string(), "exec: exec e1 exists");
        assert!(matches!(
            Error::from_agent("x", ttrpc::Error::LocalClosed),
            Error::Internal(_)
        ));
    }
}
