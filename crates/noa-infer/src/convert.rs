//! Converts a sentence-transformers BERT model (`model.safetensors`, `config.json`, `tokenizer.json`) into a
//! GGUF file that llama.cpp runs as an embedding model: the catalog's embedding model ships in that form.
//!
//! The layout follows llama.cpp's own converter (`conversion/bert.py` and gguf-py): the architecture `bert`,
//! its hyperparameters, the WordPiece vocabulary written the way llama.cpp's WPM tokenizer matches it (a
//! word-initial piece gets the `▁` marker, a `##` continuation loses its `##`), and the tensors renamed to
//! llama.cpp's names. Every tensor stays F32, so the vectors are those of the original model.

use serde_json::Value;
use std::collections::HashMap;
use std::io::Write;

/// The files of a sentence-transformers model that the conversion reads.
pub struct BertFiles<'a> {
    pub config: &'a [u8],
    pub tokenizer: &'a [u8],
    /// `1_Pooling/config.json`, if the model has one (mean pooling is assumed without it).
    pub pooling: Option<&'a [u8]>,
    pub safetensors: &'a [u8],
}

/// GGUF metadata value types (gguf.h).
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
/// ggml tensor type of F32 data.
const GGML_F32: u32 = 0;
const ALIGNMENT: usize = 32;

/// A GGUF v3 file being built in memory: metadata, then tensor infos, then aligned tensor data.
#[derive(Default)]
pub struct GgufWriter {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, Vec<u8>)>,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

impl GgufWriter {
    fn key(&mut self, key: &str, kind: u32) {
        put_str(&mut self.kv, key);
        self.kv.extend_from_slice(&kind.to_le_bytes());
        self.n_kv += 1;
    }

    pub fn u32(&mut self, key: &str, v: u32) {
        self.key(key, T_U32);
        self.kv.extend_from_slice(&v.to_le_bytes());
    }

    pub fn f32(&mut self, key: &str, v: f32) {
        self.key(key, T_F32);
        self.kv.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bool(&mut self, key: &str, v: bool) {
        self.key(key, T_BOOL);
        self.kv.push(v as u8);
    }

    pub fn string(&mut self, key: &str, v: &str) {
        self.key(key, T_STRING);
        put_str(&mut self.kv, v);
    }

    pub fn strings(&mut self, key: &str, v: &[String]) {
        self.key(key, T_ARRAY);
        self.kv.extend_from_slice(&T_STRING.to_le_bytes());
        self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for s in v {
            put_str(&mut self.kv, s);
        }
    }

    pub fn i32s(&mut self, key: &str, v: &[i32]) {
        self.key(key, T_ARRAY);
        self.kv.extend_from_slice(&T_I32.to_le_bytes());
        self.kv.extend_from_slice(&(v.len() as u64).to_le_bytes());
        for x in v {
            self.kv.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// Adds an F32 tensor; `ne` is in GGUF order (innermost dimension first), `data` little-endian F32.
    pub fn tensor(&mut self, name: &str, ne: Vec<u64>, data: Vec<u8>) {
        self.tensors.push((name.to_owned(), ne, data));
    }

    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let pad = |n: usize| n.div_ceil(ALIGNMENT) * ALIGNMENT;
        let mut head = Vec::with_capacity(self.kv.len() + 64 * self.tensors.len() + 64);
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&self.n_kv.to_le_bytes());
        head.extend_from_slice(&self.kv);
        let mut offset = 0usize;
        for (name, ne, data) in &self.tensors {
            put_str(&mut head, name);
            head.extend_from_slice(&(ne.len() as u32).to_le_bytes());
            for d in ne {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&GGML_F32.to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset += pad(data.len());
        }
        head.resize(pad(head.len()), 0);
        out.write_all(&head)?;
        for (_, _, data) in &self.tensors {
            out.write_all(data)?;
            out.write_all(&vec![0u8; pad(data.len()) - data.len()])?;
        }
        Ok(())
    }
}

/// The tensors of a safetensors file: name → (dtype, shape, bytes).
struct SafeTensors<'a> {
    tensors: HashMap<String, (String, Vec<u64>, &'a [u8])>,
}

fn parse_safetensors(bytes: &[u8]) -> Result<SafeTensors<'_>, String> {
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .ok_or("model.safetensors: shorter than its 8-byte header length")?;
    let end = 8usize
        .checked_add(usize::try_from(len).map_err(|_| "model.safetensors: header too long")?)
        .filter(|&e| e <= bytes.len())
        .ok_or(format!(
            "model.safetensors: the header claims {len} bytes but the file has {}",
            bytes.len()
        ))?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..end])
        .map_err(|e| format!("model.safetensors: the header is not a JSON object: {e}"))?;
    let data = &bytes[end..];
    let mut tensors = HashMap::new();
    for (name, t) in header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = t["dtype"]
            .as_str()
            .ok_or(format!("model.safetensors: {name}: no dtype"))?
            .to_owned();
        let shape = t["shape"]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .ok_or(format!("model.safetensors: {name}: no shape"))?;
        let range = t["data_offsets"]
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
            .filter(|r| r.len() == 2 && r[0] <= r[1] && r[1] <= data.len() as u64)
            .ok_or(format!(
                "model.safetensors: {name}: data_offsets missing or past the end of the file"
            ))?;
        tensors.insert(
            name,
            (dtype, shape, &data[range[0] as usize..range[1] as usize]),
        );
    }
    Ok(SafeTensors { tensors })
}

fn config_u32(config: &Value, key: &str) -> Result<u32, String> {
    config[key]
        .as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .filter(|&v| v > 0)
        .ok_or(format!(
            "config.json: {key} is missing or not a positive whole number"
        ))
}

/// A vocabulary as llama.cpp's WPM tokenizer reads it: the tokens by id, each token's type, and the original
/// text's id.
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<i32>,
    ids: HashMap<String, u32>,
}

/// The vocabulary of a WordPiece `tokenizer.json`.
fn vocabulary(tokenizer: &Value) -> Result<Vocabulary, String> {
    let model = &tokenizer["model"];
    if model["type"].as_str() != Some("WordPiece") {
        return Err(format!(
            "tokenizer.json: model.type is {}, not WordPiece (only BERT WordPiece models convert)",
            model["type"]
        ));
    }
    let prefix = model["continuing_subword_prefix"].as_str().unwrap_or("##");
    let vocab = model["vocab"]
        .as_object()
        .ok_or("tokenizer.json: model.vocab is not an object")?;
    let mut by_id: Vec<Option<&str>> = vec![None; vocab.len()];
    let mut ids = HashMap::new();
    for (text, id) in vocab {
        let id = id
            .as_u64()
            .filter(|&i| (i as usize) < by_id.len())
            .ok_or(format!(
                "tokenizer.json: model.vocab[{text:?}] is not an id below {}",
                by_id.len()
            ))?;
        if by_id[id as usize].replace(text).is_some() {
            return Err(format!(
                "tokenizer.json: id {id} is given to two tokens in model.vocab"
            ));
        }
        ids.insert(text.clone(), id as u32);
    }
    let special: std::collections::HashSet<u64> = tokenizer["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["special"].as_bool() == Some(true))
        .filter_map(|t| t["id"].as_u64())
        .collect();
    let mut tokens = Vec::with_capacity(by_id.len());
    let mut types = Vec::with_capacity(by_id.len());
    for (id, text) in by_id.into_iter().enumerate() {
        let text = text.ok_or(format!("tokenizer.json: no token has id {id}"))?;
        if special.contains(&(id as u64)) {
            tokens.push(text.to_owned());
            types.push(3); // control
        } else {
            tokens.push(match text.strip_prefix(prefix) {
                Some(rest) => rest.to_owned(),
                None => format!("\u{2581}{text}"),
            });
            types.push(1); // normal
        }
    }
    Ok(Vocabulary { tokens, types, ids })
}

/// Writes the GGUF form of a sentence-transformers BERT model.
pub fn bert_to_gguf(files: &BertFiles, name: &str, out: &mut impl Write) -> Result<(), String> {
    let config: Value = serde_json::from_slice(files.config)
        .map_err(|e| format!("config.json is not JSON: {e}"))?;
    if config["model_type"].as_str() != Some("bert") {
        return Err(format!(
            "config.json: model_type is {}, not bert",
            config["model_type"]
        ));
    }
    if let Some(act) = config["hidden_act"].as_str().filter(|a| *a != "gelu") {
        return Err(format!(
            "config.json: hidden_act {act} is not supported (llama.cpp's BERT uses gelu)"
        ));
    }
    let hidden = config_u32(&config, "hidden_size")?;
    let layers = config_u32(&config, "num_hidden_layers")?;
    let heads = config_u32(&config, "num_attention_heads")?;
    let ff = config_u32(&config, "intermediate_size")?;
    let positions = config_u32(&config, "max_position_embeddings")?;
    let type_vocab = config_u32(&config, "type_vocab_size")?;
    let eps = config["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32;
    // Sentence-transformers names its pooling in 1_Pooling/config.json; llama.cpp's types: 1 mean, 2 CLS.
    let pooling = match files.pooling {
        None => 1,
        Some(p) => {
            let p: Value = serde_json::from_slice(p)
                .map_err(|e| format!("1_Pooling/config.json is not JSON: {e}"))?;
            if p["pooling_mode_mean_tokens"].as_bool() == Some(true) {
                1
            } else if p["pooling_mode_cls_token"].as_bool() == Some(true) {
                2
            } else {
                return Err(
                    "1_Pooling/config.json: only mean or CLS pooling converts to llama.cpp".into(),
                );
            }
        }
    };
    let tokenizer: Value = serde_json::from_slice(files.tokenizer)
        .map_err(|e| format!("tokenizer.json is not JSON: {e}"))?;
    let Vocabulary { tokens, types, ids } = vocabulary(&tokenizer)?;
    let id = |t: &str| {
        ids.get(t)
            .copied()
            .ok_or(format!("tokenizer.json: the vocabulary has no {t} token"))
    };
    let lowercase = tokenizer["normalizer"]["lowercase"]
        .as_bool()
        .unwrap_or(true);

    let mut w = GgufWriter::default();
    w.string("general.architecture", "bert");
    w.string("general.type", "model");
    w.string("general.name", name);
    w.u32("general.file_type", 0); // all F32
    w.u32("general.quantization_version", 2);
    w.u32("bert.context_length", positions);
    w.u32("bert.embedding_length", hidden);
    w.u32("bert.feed_forward_length", ff);
    w.u32("bert.block_count", layers);
    w.u32("bert.attention.head_count", heads);
    w.f32("bert.attention.layer_norm_epsilon", eps);
    w.bool("bert.attention.causal", false);
    w.u32("bert.pooling_type", pooling);
    w.string("tokenizer.ggml.model", "bert");
    w.u32("tokenizer.ggml.token_type_count", type_vocab);
    w.strings("tokenizer.ggml.tokens", &tokens);
    w.i32s("tokenizer.ggml.token_type", &types);
    w.u32("tokenizer.ggml.bos_token_id", id("[CLS]")?);
    w.u32("tokenizer.ggml.eos_token_id", id("[SEP]")?);
    w.u32("tokenizer.ggml.unknown_token_id", id("[UNK]")?);
    // (sic: llama.cpp's key is spelled this way.)
    w.u32("tokenizer.ggml.seperator_token_id", id("[SEP]")?);
    w.u32("tokenizer.ggml.padding_token_id", id("[PAD]")?);
    if let Ok(mask) = id("[MASK]") {
        w.u32("tokenizer.ggml.mask_token_id", mask);
    }
    w.bool("tokenizer.ggml.add_bos_token", true);
    w.bool("tokenizer.ggml.add_eos_token", true);
    w.bool("tokenizer.ggml.normalizer.lowercase", lowercase);

    let st = parse_safetensors(files.safetensors)?;
    let vocab = tokens.len() as u64;
    let (h, f) = (hidden as u64, ff as u64);
    // (HF name, GGUF name, expected safetensors shape).
    let mut map: Vec<(String, String, Vec<u64>)> = vec![
        (
            "embeddings.word_embeddings.weight".into(),
            "token_embd.weight".into(),
            vec![vocab, h],
        ),
        (
            "embeddings.token_type_embeddings.weight".into(),
            "token_types.weight".into(),
            vec![type_vocab as u64, h],
        ),
        (
            "embeddings.position_embeddings.weight".into(),
            "position_embd.weight".into(),
            vec![positions as u64, h],
        ),
        (
            "embeddings.LayerNorm.weight".into(),
            "token_embd_norm.weight".into(),
            vec![h],
        ),
        (
            "embeddings.LayerNorm.bias".into(),
            "token_embd_norm.bias".into(),
            vec![h],
        ),
    ];
    for n in 0..layers {
        let hf = format!("encoder.layer.{n}.");
        let gg = format!("blk.{n}.");
        for (from, to, shape) in [
            ("attention.self.query", "attn_q", vec![h, h]),
            ("attention.self.key", "attn_k", vec![h, h]),
            ("attention.self.value", "attn_v", vec![h, h]),
            ("attention.output.dense", "attn_output", vec![h, h]),
            ("attention.output.LayerNorm", "attn_output_norm", vec![h]),
            ("intermediate.dense", "ffn_up", vec![f, h]),
            ("output.dense", "ffn_down", vec![h, f]),
            ("output.LayerNorm", "layer_output_norm", vec![h]),
        ] {
            let bias = if shape.len() == 2 { shape[0] } else { h };
            map.push((
                format!("{hf}{from}.weight"),
                format!("{gg}{to}.weight"),
                shape,
            ));
            map.push((
                format!("{hf}{from}.bias"),
                format!("{gg}{to}.bias"),
                vec![bias],
            ));
        }
    }
    for (from, to, shape) in map {
        // Some checkpoints prefix every name with `bert.`.
        let (dtype, found, data) = st
            .tensors
            .get(&from)
            .or_else(|| st.tensors.get(&format!("bert.{from}")))
            .ok_or(format!("model.safetensors: tensor {from} is missing"))?;
        if dtype != "F32" {
            return Err(format!(
                "model.safetensors: {from} is {dtype}; only F32 checkpoints convert"
            ));
        }
        if *found != shape {
            return Err(format!(
                "model.safetensors: {from} has shape {found:?}, expected {shape:?} from config.json"
            ));
        }
        if data.len() as u64 != shape.iter().product::<u64>() * 4 {
            return Err(format!(
                "model.safetensors: {from} holds {} bytes, not {} F32 values",
                data.len(),
                shape.iter().product::<u64>()
            ));
        }
        // GGUF lists dimensions innermost first; the row-major bytes stay as they are.
        w.tensor(&to, shape.into_iter().rev().collect(), data.to_vec());
    }
    w.write_to(out)
        .map_err(|e| format!("cannot write the GGUF file: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-layer BERT with made-up weights, as sentence-transformers would save it.
    fn tiny() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let config = serde_json::json!({"model_type": "bert", "hidden_act": "gelu", "hidden_size": 4,
            "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 8,
            "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12});
        let vocab = [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cat", "##s", "kit",
        ];
        let tokenizer = serde_json::json!({
            "added_tokens": (0..5).map(|i| serde_json::json!({"id": i, "content": vocab[i], "special": true})).collect::<Vec<_>>(),
            "normalizer": {"type": "BertNormalizer", "lowercase": true},
            "model": {"type": "WordPiece", "continuing_subword_prefix": "##",
                      "vocab": vocab.iter().enumerate().map(|(i, t)| (t.to_string(), serde_json::json!(i))).collect::<serde_json::Map<_, _>>()}
        });
        let mut shapes: Vec<(String, Vec<u64>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![8, 4]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, 4]),
            ("embeddings.position_embeddings.weight".into(), vec![16, 4]),
            ("embeddings.LayerNorm.weight".into(), vec![4]),
            ("embeddings.LayerNorm.bias".into(), vec![4]),
            ("pooler.dense.weight".into(), vec![4, 4]),
        ];
        for n in 0..2 {
            for (p, s) in [
                ("attention.self.query", vec![4, 4]),
                ("attention.self.key", vec![4, 4]),
                ("attention.self.value", vec![4, 4]),
                ("attention.output.dense", vec![4, 4]),
                ("attention.output.LayerNorm", vec![4]),
                ("intermediate.dense", vec![8, 4]),
                ("output.dense", vec![4, 8]),
                ("output.LayerNorm", vec![4]),
            ] {
                let b = vec![if s.len() == 2 { s[0] } else { 4 }];
                shapes.push((format!("encoder.layer.{n}.{p}.weight"), s));
                shapes.push((format!("encoder.layer.{n}.{p}.bias"), b));
            }
        }
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape) in shapes {
            let n: u64 = shape.iter().product();
            let start = data.len();
            for i in 0..n {
                data.extend_from_slice(&(i as f32 * 0.5).to_le_bytes());
            }
            header.insert(
                name,
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut st = (header.len() as u64).to_le_bytes().to_vec();
        st.extend_from_slice(&header);
        st.extend_from_slice(&data);
        (
            serde_json::to_vec(&config).unwrap(),
            serde_json::to_vec(&tokenizer).unwrap(),
            st,
        )
    }

    fn convert(config: &[u8], tokenizer: &[u8], st: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        bert_to_gguf(
            &BertFiles {
                config,
                tokenizer,
                pooling: None,
                safetensors: st,
            },
            "tiny",
            &mut out,
        )?;
        Ok(out)
    }

    #[test]
    fn a_bert_checkpoint_becomes_a_gguf_file_llama_cpp_can_read() {
        let (config, tokenizer, st) = tiny();
        let out = convert(&config, &tokenizer, &st).unwrap();
        let header = crate::gguf::read_header(std::io::Cursor::new(&out)).unwrap();
        assert_eq!(header.version, 3);
        // 5 embedding tensors and 16 per layer; the pooler is left out.
        assert_eq!(header.tensors, 5 + 16 * 2);
        let m = &header.metadata;
        assert_eq!(m["general.architecture"].as_str(), Some("bert"));
        assert_eq!(m["bert.block_count"].as_u64(), Some(2));
        assert_eq!(m["bert.pooling_type"].as_u64(), Some(1));
        assert_eq!(m["bert.attention.causal"], crate::gguf::Value::Bool(false));
        assert_eq!(m["tokenizer.ggml.bos_token_id"].as_u64(), Some(2));
        assert_eq!(m["tokenizer.ggml.seperator_token_id"].as_u64(), Some(3));
        assert_eq!(
            m["tokenizer.ggml.tokens"],
            crate::gguf::Value::Array {
                kind: T_STRING,
                len: 8
            }
        );
        // The tensor data starts aligned and the file ends at the last padded tensor.
        assert_eq!(out.len() % ALIGNMENT, 0);
    }

    #[test]
    fn wordpiece_tokens_are_written_the_way_the_wpm_tokenizer_matches_them() {
        let (_, tokenizer, _) = tiny();
        let Vocabulary { tokens, types, .. } =
            vocabulary(&serde_json::from_slice(&tokenizer).unwrap()).unwrap();
        assert_eq!(&tokens[..3], ["[PAD]", "[UNK]", "[CLS]"]);
        assert_eq!(&tokens[5..], ["\u{2581}cat", "s", "\u{2581}kit"]);
        assert_eq!(types, [3, 3, 3, 3, 3, 1, 1, 1]);
    }

    #[test]
    fn bad_checkpoints_are_refused_with_what_is_wrong() {
        let (config, tokenizer, st) = tiny();
        let mut c: Value = serde_json::from_slice(&config).unwrap();
        c["hidden_size"] = 5.into();
        let e = convert(&serde_json::to_vec(&c).unwrap(), &tokenizer, &st).unwrap_err();
        assert!(
            e.contains("embeddings.word_embeddings.weight has shape [8, 4], expected [8, 5]"),
            "{e}"
        );
        c["hidden_size"] = "x".into();
        let e = convert(&serde_json::to_vec(&c).unwrap(), &tokenizer, &st).unwrap_err();
        assert!(e.contains("config.json: hidden_size is missing"), "{e}");
        let e = convert(&config, &tokenizer, &st[..st.len() - 100]).unwrap_err();
        assert!(e.contains("past the end of the file"), "{e}");
        let e = convert(&config, &tokenizer, &st[..st.len() / 2]).unwrap_err();
        assert!(e.contains("the header claims"), "{e}");
        let e = convert(&config, &tokenizer, &st[..4]).unwrap_err();
        assert!(e.contains("8-byte header"), "{e}");
        let e = convert(&config, b"{}", &st).unwrap_err();
        assert!(e.contains("not WordPiece"), "{e}");
    }

    proptest::proptest! {
        /// Arbitrary bytes as any of the three files never panic the converter.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256), which in 0..3usize) {
            let (config, tokenizer, st) = tiny();
            let _ = match which {
                0 => convert(&bytes, &tokenizer, &st),
                1 => convert(&config, &bytes, &st),
                _ => convert(&config, &tokenizer, &bytes),
            };
        }
    }
}
