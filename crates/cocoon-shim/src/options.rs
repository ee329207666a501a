//! `runtimeoptions.v1.Options`: how containerd 1.6 passes a handler's
//! `ConfigPath` (and `ctr --runtime-config-path`) to the shim. The 0.11
//! protos crate has no type for it, so the three fields are decoded here.

use protobuf::well_known_types::any::Any;
use protobuf::CodedInputStream;

/// The `type_url` containerd uses.
pub const TYPE_URL: &str = "runtimeoptions.v1.Options";

/// The decoded options.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub type_url: String,
    pub config_path: String,
    pub config_body: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error("runtime options of type {0:?} are not supported (expected {TYPE_URL})")]
    WrongType(String),
    #[error("malformed runtime options: {0}")]
    Malformed(String),
}

/// Decodes the task's options; `None` when containerd sent none.
pub fn decode(any: Option<&Any>) -> Result<Option<RuntimeOptions>, OptionsError> {
    let Some(any) = any else { return Ok(None) };
    if any.type_url.is_empty() && any.value.is_empty() {
        return Ok(None);
    }
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    if name != TYPE_URL {
        return Err(OptionsError::WrongType(any.type_url.clone()));
    }
    let mut opts = RuntimeOptions::default();
    let mut is = CodedInputStream::from_bytes(&any.value);
    let bad = |e: protobuf::Error| OptionsError::Malformed(e.to_string());
    while !is.eof().map_err(bad)? {
        let tag = is.read_raw_varint32().map_err(bad)?;
        match (tag >> 3, tag & 7) {
            (1, 2) => opts.type_url = is.read_string().map_err(bad)?,
            (2, 2) => opts.config_path = is.read_string().map_err(bad)?,
            (3, 2) => opts.config_body = is.read_bytes().map_err(bad)?,
            (_, wire) => skip(&mut is, wire).map_err(bad)?,
        }
    }
    Ok(Some(opts))
}

fn skip(is: &mut CodedInputStream<'_>, wire: u32) -> protobuf::Result<()> {
    match wire {
        0 => is.read_raw_varint64().map(drop),
        1 => is.read_raw_little_endian64().map(drop),
        2 => {
            let n = is.read_raw_varint32()?;
            is.skip_raw_bytes(n)
        }
        5 => is.read_raw_little_endian32().map(drop),
        _ => Err(protobuf::Error::from(std::io::Error::other(format!(
            "wire type {wire}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::CodedOutputStream;

    fn encode(fields: &[(u32, &[u8])], extra_varint: bool) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut out);
            if extra_varint {
                os.write_uint64(9, 77).unwrap();
            }
            for (n, v) in fields {
                os.write_bytes(*n, v).unwrap();
            }
            os.flush().unwrap();
        }
        out
    }

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn decodes_config_path() {
        let v = encode(
            &[
                (1, b"io.containerd.cocoon.v2"),
                (2, b"/etc/cocoon/small.toml"),
            ],
            true,
        );
        let o = decode(Some(&any("runtimeoptions.v1.Options", v)))
            .unwrap()
            .unwrap();
        assert_eq!(o.config_path, "/etc/cocoon/small.toml");
        assert_eq!(o.type_url, "io.containerd.cocoon.v2");
        let v = encode(&[(3, b"[hypervisor]")], false);
        let o = decode(Some(&any(
            "type.googleapis.com/runtimeoptions.v1.Options",
            v,
        )))
        .unwrap()
        .unwrap();
        assert_eq!(o.config_body, b"[hypervisor]");
        assert_eq!(o.config_path, "");
    }

    #[test]
    fn absent_options_are_none() {
        assert_eq!(decode(None).unwrap(), None);
        assert_eq!(decode(Some(&Any::default())).unwrap(), None);
    }

    #[test]
    fn other_types_and_garbage_are_errors() {
        let e = decode(Some(&any("containerd.runc.v1.Options", vec![]))).unwrap_err();
        assert!(matches!(e, OptionsError::WrongType(_)));
        let e = decode(Some(&any(
            "runtimeoptions.v1.Options",
            vec![0x12, 0x05, b'a'],
        )))
        .unwrap_err();
        assert!(matches!(e, OptionsError::Malformed(_)));
    }
}
