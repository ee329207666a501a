//! The agent protocol: generated from `proto/agent.proto` (ttrpc-codegen, no
//! protoc), plus what both sides agree on: constants, the stream header,
//! the validated [`Id`] and the [`Error`] whose variants are gRPC codes.

pub mod error;
pub mod id;
pub mod network;

pub use error::Error;
pub use id::{Id, IdKind, InvalidId};

/// Generated message types.
#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unused_imports,
    unused_results,
    unused_mut
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Generated ttrpc client and server glue.
#[allow(
    clippy::all,
    dead_code,
    missing_docs,
    non_camel_case_types,
    non_snake_case,
    unused_imports,
    unused_results
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// Vsock port of the agent's ttrpc service.
pub const AGENT_PORT: u32 = 1024;

/// Vsock port of the agent's stdio streams. A connection starts with one
/// header line (see [`StreamHeader`]), then carries raw bytes one way.
pub const STREAM_PORT: u32 = 1025;

/// virtio-fs tag of the sandbox's shared directory.
pub const SHARE_TAG: &str = "cocoon";

/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARE_DIR: &str = "/run/cocoon/shared";

/// The pod's `/dev/shm` in the guest: a tmpfs of the agent's that every
/// container of the pod binds (a host tmpfs shared over virtio-fs would
/// not be shared memory between the guest's processes).
pub const GUEST_SHM_DIR: &str = "/run/cocoon/shm";

/// The annotations containerd's CRI plugin puts on every container of a
/// pod, which both sides read.
pub mod cri {
    /// `sandbox` for the pod's sandbox (pause) container, `container` for
    /// the others.
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    /// The id of the pod's sandbox container.
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    /// [`CONTAINER_TYPE`] of the sandbox container.
    pub const TYPE_SANDBOX: &str = "sandbox";
    /// [`CONTAINER_TYPE`] of a pod's other containers.
    pub const TYPE_CONTAINER: &str = "container";
}

/// Which stdio stream a stream connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdin => "stdin",
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }
}

/// The first line of a stream connection: `<kind> <container-id> [<exec-id>]\n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub kind: StreamKind,
    pub container_id: Id,
    /// `None` for the container's init process.
    pub exec_id: Option<Id>,
}

impl StreamHeader {
    /// The longest header line, newline included.
    pub const MAX_LEN: usize = 8 + 2 * (Id::MAX_LEN + 1);

    pub fn encode(&self) -> String {
        format!(
            "{} {} {}\n",
            self.kind.as_str(),
            self.container_id,
            self.exec_id.as_ref().map_or("", |e| e.as_str())
        )
    }

    pub fn decode(line: &str) -> Option<Self> {
        let mut it = line.trim_end_matches('\n').split(' ');
        let kind = match it.next()? {
            "stdin" => StreamKind::Stdin,
            "stdout" => StreamKind::Stdout,
            "stderr" => StreamKind::Stderr,
            _ => return None,
        };
        let container_id = Id::container(it.next()?).ok()?;
        let exec_id = Id::exec_or_init(it.next().unwrap_or("")).ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            kind,
            container_id,
            exec_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_header_round_trips() {
        for exec_id in [None, Some(Id::exec("e1").unwrap())] {
            let h = StreamHeader {
                kind: StreamKind::Stderr,
                container_id: Id::container("c1").unwrap(),
                exec_id,
            };
            assert!(h.encode().len() <= StreamHeader::MAX_LEN);
            assert_eq!(StreamHeader::decode(&h.encode()), Some(h));
        }
        assert_eq!(StreamHeader::decode("stdout ../x\n"), None);
        assert_eq!(StreamHeader::decode("stdout \n"), None);
        assert_eq!(StreamHeader::decode("tty c1\n"), None);
        assert_eq!(StreamHeader::decode("stdin a b c\n"), None);
    }
}
