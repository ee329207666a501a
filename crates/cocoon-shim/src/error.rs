//! The shim's errors: the protocol's [`cocoon_protocols::Error`], whose
//! variants are gRPC codes, shared with the agent and the runtime.

pub use cocoon_protocols::error::{Error, Result};
