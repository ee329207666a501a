//! A small QMP client: capabilities negotiation, then one command at a time.
//!
//! QEMU is a host process, but it can be stuck (a vCPU thread holding the
//! big QEMU lock while the guest misbehaves, a hung vhost-user backend), so
//! every call has a deadline and every line read is bounded.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The deadline Cocoon gives each QMP call.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest QMP line (greeting, reply or event) we accept. Replies to the
/// commands Cocoon sends are a few hundred bytes.
pub const MAX_LINE: usize = 1 << 20;

/// How much of a malformed line an error quotes.
const QUOTE_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect")]
    Connect(#[source] std::io::Error),
    #[error("i/o")]
    Io(#[source] std::io::Error),
    #[error("connection closed")]
    Closed,
    #[error("malformed reply {0:?}")]
    Malformed(String),
    #[error("{class}: {desc}")]
    Command { class: String, desc: String },
    #[error("{what}: no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("a line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    /// An earlier call timed out or was cut mid-line: a reply still on its
    /// way could be taken for the answer to the next command.
    #[error("connection unusable after an earlier failure")]
    Broken,
}

/// A CPU slot QEMU can hotplug a vCPU into.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSlot {
    /// The CPU device type (`max-x86_64-cpu`, `host-x86_64-cpu`, ...).
    pub driver: String,
    /// The topology properties naming the slot (`socket-id`, `core-id`, ...).
    pub props: serde_json::Map<String, Value>,
}

/// A negotiated QMP connection.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    broken: bool,
}

impl Qmp {
    /// Connects and leaves capabilities-negotiation mode, all within
    /// `timeout`; each later command gets `timeout` too.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let connect = async {
            let stream = UnixStream::connect(path).await.map_err(QmpError::Connect)?;
            let (r, w) = stream.into_split();
            let mut qmp = Self {
                reader: BufReader::new(r),
                writer: w,
                timeout,
                broken: false,
            };
            let greeting = qmp.read_message().await?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Malformed(quote(&greeting.to_string())));
            }
            qmp.send_and_receive("qmp_capabilities", None).await?;
            Ok(qmp)
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| QmpError::Timeout {
                what: "connect and negotiate".into(),
                timeout,
            })?
    }

    /// Reads one line, at most [`MAX_LINE`] bytes, as JSON.
    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            if n >= MAX_LINE {
                return Err(QmpError::LineTooLong { limit: MAX_LINE });
            }
            return Err(QmpError::Closed);
        }
        serde_json::from_slice(&line)
            .map_err(|_| QmpError::Malformed(quote(&String::from_utf8_lossy(&line))))
    }

    /// Runs one command and returns its `return` value; events are skipped.
    /// Fails with [`QmpError::Timeout`] if QEMU does not answer in time,
    /// after which this connection is [`QmpError::Broken`].
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, QmpError> {
        if self.broken {
            return Err(QmpError::Broken);
        }
        let timeout = self.timeout;
        let r = match tokio::time::timeout(timeout, self.send_and_receive(command, args)).await {
            Ok(r) => r,
            Err(_) => Err(QmpError::Timeout {
                what: command.into(),
                timeout,
            }),
        };
        if matches!(
            r,
            Err(QmpError::Timeout { .. } | QmpError::LineTooLong { .. } | QmpError::Io(_))
        ) {
            self.broken = true;
        }
        r
    }

    async fn send_and_receive(
        &mut self,
        command: &str,
        args: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(QmpError::Io)?;
        loop {
            let reply = self.read_message().await?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                let s = |k: &str| quote(e.get(k).and_then(Value::as_str).unwrap_or(""));
                return Err(QmpError::Command {
                    class: s("class"),
                    desc: s("desc"),
                });
            }
            // An asynchronous event: not ours.
        }
    }

    /// `query-status`: the run state, e.g. `running` or `paused`.
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None).await?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Malformed(quote(&r.to_string())))
    }

    pub async fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    pub async fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `query-hotpluggable-cpus`: the CPU slots not yet plugged (no
    /// `qom-path`), each as its driver and the `props` that name it, in
    /// QEMU's order reversed (QEMU lists the highest slot first).
    pub async fn free_cpu_slots(&mut self) -> Result<Vec<CpuSlot>, QmpError> {
        let r = self.execute("query-hotpluggable-cpus", None).await?;
        let list = r
            .as_array()
            .ok_or_else(|| QmpError::Malformed(quote(&r.to_string())))?;
        let mut slots = Vec::new();
        for c in list {
            if c.get("qom-path").is_some() {
                continue;
            }
            let driver = c.get("type").and_then(Value::as_str);
            let props = c.get("props").and_then(Value::as_object);
            match (driver, props) {
                (Some(d), Some(p)) => slots.push(CpuSlot {
                    driver: d.to_string(),
                    props: p.clone(),
                }),
                _ => return Err(QmpError::Malformed(quote(&c.to_string()))),
            }
        }
        slots.reverse();
        Ok(slots)
    }

    /// `device_add` of a vCPU in `slot`, named `id`.
    pub async fn add_cpu(&mut self, id: &str, slot: &CpuSlot) -> Result<(), QmpError> {
        let mut args = slot.props.clone();
        args.insert("driver".into(), slot.driver.clone().into());
        args.insert("id".into(), id.into());
        self.execute("device_add", Some(Value::Object(args)))
            .await
            .map(drop)
    }

    /// A DIMM of `bytes` named `id`, backed by shared memfd memory (named
    /// `id-mem`) that vhost-user daemons can map like the boot RAM: the
    /// backend, then the `pc-dimm`; if the device fails, the backend goes.
    pub async fn add_dimm(&mut self, id: &str, bytes: u64) -> Result<(), QmpError> {
        let mem = format!("{id}-mem");
        self.execute(
            "object-add",
            Some(json!({
                "qom-type": "memory-backend-memfd",
                "id": mem,
                "size": bytes,
                "share": true,
            })),
        )
        .await?;
        let added = self
            .execute(
                "device_add",
                Some(json!({ "driver": "pc-dimm", "id": id, "memdev": mem })),
            )
            .await;
        if added.is_err() && !self.broken {
            let _ = self.execute("object-del", Some(json!({ "id": mem }))).await;
        }
        added.map(drop)
    }

    /// Asks QEMU to exit. The connection may close before the reply arrives.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// At most [`QUOTE_MAX`] bytes of `s`, for an error message.
fn quote(s: &str) -> String {
    if s.len() <= QUOTE_MAX {
        return s.to_string();
    }
    let mut end = QUOTE_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP peer: greeting, then one canned reply per command.
    async fn fake_qemu(listener: UnixListener, replies: Vec<&'static str>) -> Vec<String> {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut r = BufReader::new(r);
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        for reply in replies {
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            seen.push(line.trim().to_string());
            w.write_all(reply.as_bytes()).await.unwrap();
        }
        // Then silence, until the client hangs up.
        let mut rest = Vec::new();
        while r.read_until(b'\n', &mut rest).await.is_ok_and(|n| n > 0) {}
        seen
    }

    #[tokio::test]
    async fn negotiates_skips_events_and_maps_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(fake_qemu(
            listener,
            vec![
                "{\"return\": {}}\n",
                "{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\", \"running\": false}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\n",
            ],
        ));
        let mut qmp = Qmp::connect(&path, QMP_TIMEOUT).await.unwrap();
        assert_eq!(qmp.status().await.unwrap(), "paused");
        let err = qmp.cont().await.unwrap_err();
        assert_eq!(err.to_string(), "GenericError: nope");
        drop(qmp);
        let seen = peer.await.unwrap();
        assert_eq!(seen[0], r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(seen[1], r#"{"execute":"query-status"}"#);
        assert_eq!(seen[2], r#"{"execute":"cont"}"#);
    }

    #[tokio::test]
    async fn hotplug_commands() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let cpus = r#"{"return": [
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 2}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 1}, "vcpus-count": 1, "type": "max-x86_64-cpu"},
            {"props": {"core-id": 0, "thread-id": 0, "socket-id": 0}, "vcpus-count": 1, "qom-path": "/machine/unattached/device[0]", "type": "max-x86_64-cpu"}
        ]}"#
        .replace('\n', " ")
            + "\n";
        let cpus: &'static str = Box::leak(cpus.into_boxed_str());
        let peer = tokio::spawn(fake_qemu(
            listener,
            vec![
                "{\"return\": {}}\n",
                cpus,
                "{\"return\": {}}\n",
                "{\"return\": {}}\n",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no free slots\"}}\n",
                "{\"return\": {}}\n",
            ],
        ));
        let mut qmp = Qmp::connect(&path, QMP_TIMEOUT).await.unwrap();
        let slots = qmp.free_cpu_slots().await.unwrap();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].props["socket-id"], 1, "lowest slot first");
        qmp.add_cpu("cpu-1", &slots[0]).await.unwrap();
        let err = qmp.add_dimm("dimm-0", 1 << 30).await.unwrap_err();
        assert_eq!(err.to_string(), "GenericError: no free slots");
        drop(qmp);
        let seen: Vec<Value> = peer.await.unwrap()[1..]
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(seen[0]["execute"], "query-hotpluggable-cpus");
        assert_eq!(
            seen[1],
            json!({"execute": "device_add", "arguments": {
                "driver": "max-x86_64-cpu", "id": "cpu-1",
                "core-id": 0, "thread-id": 0, "socket-id": 1}})
        );
        assert_eq!(
            seen[2],
            json!({"execute": "object-add", "arguments": {
                "qom-type": "memory-backend-memfd", "id": "dimm-0-mem",
                "size": 1u64 << 30, "share": true}})
        );
        assert_eq!(seen[3]["arguments"]["driver"], "pc-dimm");
        assert_eq!(seen[3]["arguments"]["memdev"], "dimm-0-mem");
        // The failed DIMM's backend is removed.
        assert_eq!(
            seen[4],
            json!({"execute": "object-del", "arguments": {"id": "dimm-0-mem"}})
        );
    }

    #[tokio::test]
    async fn a_silent_qemu_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Accepts, never greets.
        let peer = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let t0 = std::time::Instant::now();
        let err = Qmp::connect(&path, Duration::from_millis(200))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(err.to_string().contains("200ms"), "{err}");
        peer.abort();
    }

    #[tokio::test]
    async fn a_command_without_answer_times_out_and_breaks_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Negotiates, then swallows the next command.
        let peer = tokio::spawn(fake_qemu(listener, vec!["{\"return\": {}}\n"]));
        let mut qmp = Qmp::connect(&path, Duration::from_millis(200))
            .await
            .unwrap();
        let err = qmp.status().await.unwrap_err();
        assert!(
            matches!(&err, QmpError::Timeout { what, .. } if what == "query-status"),
            "{err}"
        );
        assert!(matches!(qmp.cont().await, Err(QmpError::Broken)));
        drop(qmp);
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn an_endless_line_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let junk = [b'x'; 4096];
            // Until the client hangs up.
            while s.write_all(&junk).await.is_ok() {}
        });
        let err = Qmp::connect(&path, QMP_TIMEOUT).await.err().unwrap();
        assert!(
            matches!(err, QmpError::LineTooLong { limit: MAX_LINE }),
            "{err}"
        );
        peer.await.unwrap();
    }
}
