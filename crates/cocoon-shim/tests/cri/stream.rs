//! A client of containerd's CRI streaming server over WebSocket, the
//! `v4.channel.k8s.io` protocol (Kubernetes' `wsstream`): every message
//! starts with a channel byte. For exec: 0 stdin, 1 stdout, 2 stderr,
//! 3 error (the final `Status` as JSON), 4 resize (`{"Width":..,"Height":..}`).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub const PROTOCOL: &str = "v4.channel.k8s.io";

/// What an interactive exec wrote, and how it ended.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error channel's `Status` (`{"status":"Success"}`, or a Failure
    /// whose `details.causes` carry the `ExitCode`).
    pub status: Option<serde_json::Value>,
}

impl Outcome {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The exit code the status reports (0 for Success).
    pub fn exit_code(&self) -> Option<i64> {
        let s = self.status.as_ref()?;
        if s["status"] == "Success" {
            return Some(0);
        }
        s.pointer("/details/causes")?
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

/// Opens the streaming URL CRI returned (http://host:port/exec/token) as a
/// WebSocket speaking `protocol`.
pub async fn open(
    url: &str,
    protocol: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    String,
> {
    let ws_url = url
        .strip_prefix("http://")
        .map(|r| format!("ws://{r}"))
        .ok_or_else(|| format!("streaming URL {url} is not http://"))?;
    let mut req = ws_url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(protocol).unwrap(),
    );
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| format!("{url}: no WebSocket handshake in 10 s"))?
    .map_err(|e| format!("{url}: {e}"))?;
    let got = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if got != protocol {
        return Err(format!(
            "{url}: server chose protocol {got:?}, not {protocol}"
        ));
    }
    Ok(ws)
}

/// Runs an exec session: sends `resize` (if any) and `stdin`, then collects
/// the output until the server closes, within `limit`.
pub async fn exec(
    url: &str,
    resize: Option<(u16, u16)>,
    stdin: &[u8],
    limit: Duration,
) -> Result<Outcome, String> {
    let mut ws = open(url, PROTOCOL).await?;
    if let Some((w, h)) = resize {
        let mut m = vec![4u8];
        m.extend_from_slice(format!("{{\"Width\":{w},\"Height\":{h}}}").as_bytes());
        ws.send(Message::binary(m))
            .await
            .map_err(|e| e.to_string())?;
    }
    if !stdin.is_empty() {
        let mut m = vec![0u8];
        m.extend_from_slice(stdin);
        ws.send(Message::binary(m))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut out = Outcome::default();
    let collect = async {
        while let Some(msg) = ws.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                // The Go server drops the connection without a close frame.
                Err(_) => break,
            };
            let Some((&ch, rest)) = data.split_first() else {
                continue;
            };
            match ch {
                1 => out.stdout.extend_from_slice(rest),
                2 => out.stderr.extend_from_slice(rest),
                3 if !rest.is_empty() => {
                    out.status =
                        Some(serde_json::from_slice(rest).map_err(|e| {
                            format!("status {:?}: {e}", String::from_utf8_lossy(rest))
                        })?)
                }
                _ => {}
            }
        }
        Ok::<_, String>(())
    };
    tokio::time::timeout(limit, collect)
        .await
        .map_err(|_| format!("exec session still open after {limit:?}"))??;
    Ok(out)
}

/// What one forwarded connection carried.
#[derive(Debug, Default)]
pub struct Forwarded {
    pub data: Vec<u8>,
    pub error: String,
}

/// Runs one port-forward session of a single port (the URL CRI's
/// PortForward returned): each channel's first message is the port (2
/// bytes, little-endian); channel 0 carries the connection's bytes, channel
/// 1 the server's error text. Sends `request`, collects until the server
/// closes, within `limit`.
pub async fn port_forward(
    url: &str,
    port: u16,
    request: &[u8],
    limit: Duration,
) -> Result<Forwarded, String> {
    let mut ws = open(url, PROTOCOL).await?;
    let mut m = vec![0u8];
    m.extend_from_slice(request);
    ws.send(Message::binary(m))
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Forwarded::default();
    let mut prefixed = [false; 2];
    let mut error = Vec::new();
    let collect = async {
        while let Some(msg) = ws.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                Err(_) => break,
            };
            let Some((&ch, mut rest)) = data.split_first() else {
                continue;
            };
            let ch = usize::from(ch);
            if ch > 1 {
                return Err(format!("message on channel {ch}"));
            }
            if !prefixed[ch] {
                if rest.len() < 2 || u16::from_le_bytes([rest[0], rest[1]]) != port {
                    return Err(format!(
                        "channel {ch} did not start with port {port}: {rest:?}"
                    ));
                }
                prefixed[ch] = true;
                rest = &rest[2..];
            }
            match ch {
                0 => out.data.extend_from_slice(rest),
                _ => error.extend_from_slice(rest),
            }
        }
        Ok::<_, String>(())
    };
    tokio::time::timeout(limit, collect)
        .await
        .map_err(|_| format!("port-forward session still open after {limit:?}"))??;
    out.error = String::from_utf8_lossy(&error).into_owned();
    Ok(out)
}
