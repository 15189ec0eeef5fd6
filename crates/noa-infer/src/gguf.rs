//! A reader of GGUF file headers: the metadata key/values, without loading the model.
//!
//! It reads what `noa model show` and the model store need (architecture, name, quantization, context length,
//! chat template, parameter and tensor counts) and rejects a corrupt or truncated file with a message that says
//! where it went wrong. Arrays (the tokenizer's vocabulary) are skipped, not kept.

use std::collections::BTreeMap;
use std::io::Read;

/// A metadata value (arrays are summarized by their element type and length).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Uint(u64),
    Float(f64),
    Bool(bool),
    Text(String),
    Array { kind: u32, len: u64 },
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Uint(v) => Some(*v),
            Value::Int(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Uint(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::Text(s) => f.write_str(s),
            Value::Array { len, .. } => write!(f, "[{len} items]"),
        }
    }
}

/// The header of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    pub version: u32,
    pub tensors: u64,
    pub metadata: BTreeMap<String, Value>,
}

/// Longest key or string accepted (a chat template is a few KiB; this bounds a corrupt length).
const MAX_STRING: u64 = 16 << 20;
/// Most metadata entries accepted.
const MAX_KV: u64 = 1 << 20;

struct Reader<R> {
    inner: R,
    at: u64,
}

impl<R: Read> Reader<R> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; n];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                format!("truncated at byte {} while reading {what}", self.at)
            } else {
                format!("read error at byte {}: {e}", self.at)
            }
        })?;
        self.at += n as u64;
        Ok(buf)
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| format!("read error at byte {}: {e}", self.at))?;
        self.at += copied;
        if copied < n {
            return Err(format!(
                "truncated at byte {} while reading {what}",
                self.at
            ));
        }
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.at;
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(format!(
                "{what} at byte {at} claims {len} bytes, more than the {MAX_STRING} allowed"
            ));
        }
        let b = self.bytes(len as usize, what)?;
        String::from_utf8(b).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    /// Size in bytes of a scalar of GGUF type `kind`, or `None` for strings and arrays.
    fn scalar_size(kind: u32) -> Option<u64> {
        match kind {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn value(&mut self, kind: u32, key: &str) -> Result<Value, String> {
        let what = format!("the value of {key}");
        Ok(match kind {
            0 => Value::Uint(self.bytes(1, &what)?[0] as u64),
            1 => Value::Int(self.bytes(1, &what)?[0] as i8 as i64),
            2 => {
                let b = self.bytes(2, &what)?;
                Value::Uint(u16::from_le_bytes([b[0], b[1]]) as u64)
            }
            3 => {
                let b = self.bytes(2, &what)?;
                Value::Int(i16::from_le_bytes([b[0], b[1]]) as i64)
            }
            4 => Value::Uint(self.u32(&what)? as u64),
            5 => Value::Int(self.u32(&what)? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32(&what)?) as f64),
            7 => Value::Bool(self.bytes(1, &what)?[0] != 0),
            8 => Value::Text(self.string(&what)?),
            9 => {
                let elem = self.u32(&what)?;
                let len = self.u64(&what)?;
                match Self::scalar_size(elem) {
                    Some(size) => {
                        let total = len
                            .checked_mul(size)
                            .ok_or_else(|| format!("{what} claims an impossible length {len}"))?;
                        self.skip(total, &what)?;
                    }
                    None if elem == 8 => {
                        for _ in 0..len {
                            let n = self.u64(&what)?;
                            if n > MAX_STRING {
                                return Err(format!("{what} holds a string of {n} bytes"));
                            }
                            self.skip(n, &what)?;
                        }
                    }
                    None => {
                        return Err(format!(
                            "{what} is an array of type {elem}, which this reader does not know"
                        ));
                    }
                }
                Value::Array { kind: elem, len }
            }
            10 => Value::Uint(self.u64(&what)?),
            11 => Value::Int(self.u64(&what)? as i64),
            12 => Value::Float(f64::from_bits(self.u64(&what)?)),
            other => return Err(format!("{key} has unknown value type {other}")),
        })
    }
}

/// Reads the header of a GGUF stream.
pub fn read_header(input: impl Read) -> Result<Header, String> {
    let mut r = Reader {
        inner: input,
        at: 0,
    };
    let magic = r.bytes(4, "the magic number")?;
    if magic != b"GGUF" {
        return Err("not a GGUF file (the first bytes are not \"GGUF\")".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 or 3 are)"
        ));
    }
    let tensors = r.u64("the tensor count")?;
    let kv = r.u64("the metadata count")?;
    if kv > MAX_KV {
        return Err(format!("the file claims {kv} metadata entries"));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..kv {
        let key = r.string(&format!("metadata key {i}"))?;
        let kind = r.u32(&format!("the type of {key}"))?;
        let value = r.value(kind, &key)?;
        metadata.insert(key, value);
    }
    Ok(Header {
        version,
        tensors,
        metadata,
    })
}

/// The quantization named by `general.file_type` (llama.cpp's `llama_ftype`).
pub fn file_type_name(t: u64) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    fn sample() -> Vec<u8> {
        let mut f = b"GGUF".to_vec();
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(&2u64.to_le_bytes());
        f.extend_from_slice(&4u64.to_le_bytes());
        f.extend(string("general.architecture"));
        f.extend_from_slice(&8u32.to_le_bytes());
        f.extend(string("llama"));
        f.extend(string("llama.context_length"));
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&8192u32.to_le_bytes());
        f.extend(string("tokenizer.ggml.tokens"));
        f.extend_from_slice(&9u32.to_le_bytes());
        f.extend_from_slice(&8u32.to_le_bytes());
        f.extend_from_slice(&2u64.to_le_bytes());
        f.extend(string("a"));
        f.extend(string("bc"));
        f.extend(string("general.file_type"));
        f.extend_from_slice(&4u32.to_le_bytes());
        f.extend_from_slice(&3u32.to_le_bytes());
        f
    }

    #[test]
    fn reads_metadata_and_skips_arrays() {
        let h = read_header(&sample()[..]).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.tensors, 2);
        assert_eq!(h.metadata["general.architecture"].as_str(), Some("llama"));
        assert_eq!(h.metadata["llama.context_length"].as_u64(), Some(8192));
        assert_eq!(
            h.metadata["tokenizer.ggml.tokens"],
            Value::Array { kind: 8, len: 2 }
        );
        assert_eq!(
            file_type_name(h.metadata["general.file_type"].as_u64().unwrap()),
            "Q4_1"
        );
    }

    #[test]
    fn bad_files_say_where() {
        let e = read_header(&b"GGML...."[..]).unwrap_err();
        assert!(e.contains("not a GGUF file"), "{e}");
        let f = sample();
        let e = read_header(&f[..f.len() - 3]).unwrap_err();
        assert!(e.starts_with("truncated at byte"), "{e}");
        let mut huge = f.clone();
        // The first key's length, made absurd.
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = read_header(&huge[..]).unwrap_err();
        assert!(e.contains("more than the"), "{e}");
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(tail in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut f = b"GGUF".to_vec();
            f.extend_from_slice(&3u32.to_le_bytes());
            f.extend_from_slice(&tail);
            let _ = read_header(&f[..]);
        }

        #[test]
        fn never_panics_on_a_damaged_sample(at in 0usize..120, byte in any::<u8>()) {
            let mut f = sample();
            let i = at % f.len();
            f[i] = byte;
            let _ = read_header(&f[..]);
        }
    }
}
