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

/// Reads one line of a handshake (a stream or port-forward header, an
/// answer), newline excluded, of fewer than `max` bytes: the peer names
/// its line's length only by ending it, so it is cut off at `max`.
pub async fn read_line_bounded(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    max: usize,
    what: &str,
) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            return Ok(line);
        }
        line.push(b);
        if line.len() >= max {
            return Err(std::io::Error::other(format!(
                "{what} too long (≥ {max} bytes)"
            )));
        }
    }
}

/// Vsock port of the agent's ttrpc service.
pub const AGENT_PORT: u32 = 1024;

/// What the agent prints on the console once it serves [`AGENT_PORT`]:
/// the host waits for it before its first connection (a hint only: the
/// boot deadline stands whatever the guest prints).
pub const AGENT_READY: &str = "agent ready on vsock port";

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

/// Vsock port of the agent's port forwarding. A connection starts with one
/// [`PortForwardHeader`] line; the agent answers with one [`PortForwardReply`]
/// line, then (if connected) the connection carries the TCP stream's bytes
/// both ways.
pub const PORT_FORWARD_PORT: u32 = 1026;

/// The first line of a port-forward connection: `<container-id> <port>\n`:
/// connect to `localhost:<port>` in the network namespace of that
/// container (the pod's sandbox container).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortForwardHeader {
    pub container_id: Id,
    pub port: u16,
}

impl PortForwardHeader {
    /// The longest header line, newline included.
    pub const MAX_LEN: usize = Id::MAX_LEN + 1 + 5 + 1;

    pub fn encode(&self) -> String {
        format!("{} {}\n", self.container_id, self.port)
    }

    pub fn decode(line: &str) -> Option<Self> {
        let (id, port) = line.trim_end_matches('\n').split_once(' ')?;
        let container_id = Id::container(id).ok()?;
        // Digits only: no sign, no spaces, no leading zeros.
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.starts_with('0') {
            return None;
        }
        let port = port.parse().ok().filter(|p| *p != 0)?;
        Some(Self { container_id, port })
    }
}

/// The agent's answer line to a [`PortForwardHeader`]: `ok\n`, or
/// `error <reason>\n` (the connection then closes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortForwardReply {
    Connected,
    Failed(String),
}

impl PortForwardReply {
    /// The longest reply line, newline included; longer reasons are cut.
    pub const MAX_LEN: usize = 256;

    pub fn encode(&self) -> String {
        match self {
            PortForwardReply::Connected => "ok\n".into(),
            PortForwardReply::Failed(why) => {
                let mut why: String = why
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                let room = Self::MAX_LEN - "error \n".len();
                while why.len() > room {
                    why.pop();
                }
                format!("error {why}\n")
            }
        }
    }

    pub fn decode(line: &str) -> Option<Self> {
        let line = line.trim_end_matches('\n');
        if line == "ok" {
            return Some(PortForwardReply::Connected);
        }
        let why = line.strip_prefix("error ")?;
        if why.chars().any(char::is_control) {
            return None;
        }
        Some(PortForwardReply::Failed(why.to_string()))
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

    #[test]
    fn port_forward_header_round_trips() {
        let h = PortForwardHeader {
            container_id: Id::container(&"a".repeat(Id::MAX_LEN)).unwrap(),
            port: 65535,
        };
        assert_eq!(h.encode().len(), PortForwardHeader::MAX_LEN);
        assert_eq!(PortForwardHeader::decode(&h.encode()), Some(h));
        for bad in [
            "c1 0\n",
            "c1 65536\n",
            "c1 +80\n",
            "c1 080\n",
            "c1  80\n",
            "../x 80\n",
            "c1\n",
            "c1 80 1\n",
            "c1 \n",
        ] {
            assert_eq!(PortForwardHeader::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn port_forward_reply_round_trips_and_is_bounded() {
        for r in [
            PortForwardReply::Connected,
            PortForwardReply::Failed("connection refused".into()),
        ] {
            assert_eq!(PortForwardReply::decode(&r.encode()), Some(r));
        }
        let long = PortForwardReply::Failed("é\nx".repeat(500)).encode();
        assert!(long.len() <= PortForwardReply::MAX_LEN, "{}", long.len());
        assert!(matches!(
            PortForwardReply::decode(&long),
            Some(PortForwardReply::Failed(_))
        ));
        assert_eq!(PortForwardReply::decode("okay\n"), None);
        assert_eq!(PortForwardReply::decode("error a\x07b\n"), None);
    }
}
