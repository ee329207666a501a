//! Port forwarding into the guest: a stream to `localhost:<port>` in the
//! network namespace of a container of the sandbox, through the agent's
//! port-forward port.

use cocoon_hypervisor::VsockStream;
use cocoon_protocols::{Error, Id, PortForwardHeader, PortForwardReply};
use tokio::io::AsyncWriteExt;

use crate::Channel;

impl Channel {
    /// Opens a stream to `localhost:<port>` in container `container`'s
    /// network namespace. The whole exchange (connect, header, the agent's
    /// answer) has the channel's stream deadline; the bytes after it are the
    /// TCP stream's.
    pub async fn port_forward(&self, container: &Id, port: u16) -> Result<VsockStream, Error> {
        let header = PortForwardHeader {
            container_id: container.clone(),
            port,
        };
        let what = || format!("forward port {port} of container {container}");
        let open = async {
            let mut s = self
                .vsock
                .connect(cocoon_protocols::PORT_FORWARD_PORT)
                .await?;
            s.write_all(header.encode().as_bytes()).await?;
            let line = cocoon_protocols::read_line_bounded(
                &mut s,
                PortForwardReply::MAX_LEN,
                "the agent's answer",
            )
            .await?;
            Ok::<_, std::io::Error>((s, String::from_utf8_lossy(&line).into_owned()))
        };
        let deadline = self.stream_timeout;
        let (stream, line) = match tokio::time::timeout(deadline, open).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(Error::Unavailable(format!("{}: {e}", what()))),
            Err(_) => {
                return Err(Error::DeadlineExceeded(format!(
                    "{}: no answer from the guest within {deadline:?}",
                    what()
                )))
            }
        };
        match PortForwardReply::decode(&line) {
            Some(PortForwardReply::Connected) => Ok(stream),
            Some(PortForwardReply::Failed(why)) => {
                Err(Error::Unavailable(format!("{}: {why}", what())))
            }
            None => Err(Error::Internal(format!(
                "{}: the agent answered {line:?}",
                what()
            ))),
        }
    }
}
