//! Encryption at rest: a data key wrapped by a key-encryption key, and the chunked blob format.
//!
//! One random 256-bit **data key** protects every blob and secret. It is stored in the
//! database only wrapped (encrypted) by a **key-encryption key** that comes from a key file (32 random bytes,
//! created at init with mode 0600) or from a passphrase through Argon2id. Rotating the wrapping key
//! ([`crate::Store::rekey`]) rewraps the data key and rewrites no blob.
//!
//! Secrets and the wrapped data key use XChaCha20-Poly1305 with random 192-bit nonces. Blobs use
//! ChaCha20-Poly1305 (measured faster here than RustCrypto's AES-256-GCM) under a key of their own,
//! `BLAKE3-derive("noa blob key v1", data key ‖ salt)` with a random 128-bit `salt` per blob, so the 96-bit
//! nonces can be the chunk counter: a blob is split into 64 KiB chunks, each sealed with the nonce
//! `index(4) ‖ last(1) ‖ 0(7)`.
//!
//! Blobs larger than a chunk are sealed ([`BlobFileSealer`]) and opened ([`BlobFileOpener`]) on a pipeline of
//! threads: whole 1 MiB blocks are sealed or decrypted in place by a worker per core, in any order, and put back
//! in order at the end. A chunk cannot be moved, dropped or appended to without failing authentication, and a
//! truncated blob is detected because its final chunk was not sealed as last.

use crate::{Error, Result};
use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305, XNonce};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Plaintext bytes per chunk.
pub const CHUNK: usize = 64 * 1024;
/// Authentication tag per chunk.
pub const TAG: usize = 16;
/// The start of every blob file and inline blob.
pub const MAGIC: &[u8; 5] = b"NOAB\x01";
/// Magic plus the per-blob salt.
pub const HEADER: usize = MAGIC.len() + 16;

/// Where the key-encryption key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A file holding 32 random bytes as hex; created (mode 0600) on first use.
    File(PathBuf),
    /// A passphrase, stretched with Argon2id and a salt kept in the store.
    Passphrase(String),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "key file {}", p.display()),
            KeySource::Passphrase(_) => f.write_str("passphrase"),
        }
    }
}

impl KeySource {
    pub fn kind(&self) -> &'static str {
        match self {
            KeySource::File(_) => "file",
            KeySource::Passphrase(_) => "passphrase",
        }
    }
}

/// 32 random bytes from the operating system.
pub fn random32() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| Error::Crypto(format!("no randomness: {e}")))?;
    Ok(b)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes `bytes` as hex to `path` with mode 0600, atomically (temp file, fsync, rename).
pub fn write_key_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let io = |e: std::io::Error| Error::Key {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(hex(bytes).as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Reads a 32-byte key written by [`write_key_file`]; `None` when the file does not exist.
pub fn read_key_file(path: &Path) -> Result<Option<[u8; 32]>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = unhex(&text)
                .filter(|b| b.len() == 32)
                .ok_or_else(|| Error::Key {
                    path: path.to_owned(),
                    message: "it does not hold 64 hex digits (a 32-byte key)".into(),
                })?;
            let mut k = [0u8; 32];
            k.copy_from_slice(&bytes);
            Ok(Some(k))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Key {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A short public name of a key-encryption key, to tell which key a store or backup needs.
pub fn kek_id(kek: &[u8; 32]) -> String {
    hex(&blake3::derive_key("noa kek id v1", kek)[..8])
}

/// Derives the key-encryption key from a passphrase with Argon2id (19 MiB, 2 passes: OWASP's baseline).
pub fn kek_from_passphrase(passphrase: &str, salt: &[u8]) -> Result<[u8; 32]> {
    let params = argon2::Params::new(19 * 1024, 2, 1, Some(32))
        .map_err(|e| Error::Crypto(format!("argon2 parameters: {e}")))?;
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    argon
        .hash_password_into(passphrase.as_bytes(), salt, &mut out)
        .map_err(|e| Error::Crypto(format!("argon2: {e}")))?;
    Ok(out)
}

/// Seals `plain` under `key` with a random nonce: `nonce(24) ‖ ciphertext ‖ tag`.
pub fn seal(key: &[u8; 32], plain: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
    let cipher = XChaCha20Poly1305::new(key.into());
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).map_err(|e| Error::Crypto(format!("no randomness: {e}")))?;
    let ct = cipher
        .encrypt(XNonce::from_slice(&nonce), Payload { msg: plain, aad })
        .map_err(|_| Error::Crypto("encryption failed".into()))?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens what [`seal`] produced; `None` when the key is wrong or the bytes were altered.
pub fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 24 + TAG {
        return None;
    }
    let cipher = XChaCha20Poly1305::new(key.into());
    cipher
        .decrypt(
            XNonce::from_slice(&sealed[..24]),
            Payload {
                msg: &sealed[24..],
                aad,
            },
        )
        .ok()
}

/// The unwrapped data key and what is derived from it.
pub struct DataKey {
    /// Key of the keyed BLAKE3 hash that names blobs, so a blob's name says nothing about its contents.
    id_key: [u8; 32],
    raw: [u8; 32],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    pub fn new(raw: [u8; 32]) -> DataKey {
        DataKey {
            id_key: blake3::derive_key("noa blob id v1", &raw),
            raw,
        }
    }

    pub fn raw(&self) -> &[u8; 32] {
        &self.raw
    }

    pub fn hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.id_key)
    }

    /// The key of one blob.
    fn blob_cipher(&self, salt: &[u8; 16]) -> BlobCipher {
        let mut material = [0u8; 48];
        material[..32].copy_from_slice(&self.raw);
        material[32..].copy_from_slice(salt);
        let key = blake3::derive_key("noa blob key v1", &material);
        BlobCipher(ChaCha20Poly1305::new((&key).into()))
    }

    /// Seals a secret value; the name is bound in, so values cannot be swapped between names.
    pub fn seal_secret(&self, name: &str, value: &[u8]) -> Result<Vec<u8>> {
        seal(&self.raw, value, name.as_bytes())
    }

    pub fn open_secret(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        open(&self.raw, sealed, name.as_bytes())
    }
}

/// The key of one blob.
struct BlobCipher(ChaCha20Poly1305);

impl BlobCipher {
    fn nonce(index: u32, last: bool) -> chacha20poly1305::Nonce {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&index.to_le_bytes());
        n[4] = u8::from(last);
        n.into()
    }

    /// Encrypts `buf` in place and appends the tag. `aad` is the blob id for the last chunk, empty otherwise.
    fn seal_in_place(&self, index: u32, last: bool, aad: &[u8], buf: &mut Vec<u8>) -> Result<()> {
        let tag = self
            .0
            .encrypt_in_place_detached(&Self::nonce(index, last), aad, buf)
            .map_err(|_| Error::Crypto("encryption failed".into()))?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Decrypts `sealed` (ciphertext ‖ tag) in place, leaving the plaintext; false when it fails authentication.
    fn open_in_place(&self, index: u32, last: bool, aad: &[u8], sealed: &mut Vec<u8>) -> bool {
        if sealed.len() < TAG {
            return false;
        }
        let at = sealed.len() - TAG;
        let tag = chacha20poly1305::Tag::clone_from_slice(&sealed[at..]);
        sealed.truncate(at);
        self.0
            .decrypt_in_place_detached(&Self::nonce(index, last), aad, sealed, &tag)
            .is_ok()
    }
}

/// Writes a new blob's header (magic and a random salt) and returns the blob's cipher.
fn write_header(key: &DataKey, out: &mut impl Write) -> Result<BlobCipher> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| Error::Crypto(format!("no randomness: {e}")))?;
    out.write_all(MAGIC).map_err(Error::BlobIo)?;
    out.write_all(&salt).map_err(Error::BlobIo)?;
    Ok(key.blob_cipher(&salt))
}

/// Reads and checks a blob's header; returns the blob's cipher. `what` names the blob in errors.
fn read_header(key: &DataKey, input: &mut impl Read, what: &str) -> Result<BlobCipher> {
    let mut header = [0u8; HEADER];
    let n = read_full(input, &mut header).map_err(Error::BlobIo)?;
    if n < HEADER || &header[..MAGIC.len()] != MAGIC {
        return Err(Error::Corrupt {
            what: what.to_owned(),
            message: "not a NOA blob (bad header)".into(),
        });
    }
    let mut salt = [0u8; 16];
    salt.copy_from_slice(&header[MAGIC.len()..]);
    Ok(key.blob_cipher(&salt))
}

/// Starts one worker per core (at most four), each taking jobs from `jobs` and sending what `work` makes of
/// them to `done`, until either side closes or `work` returns `None`.
fn spawn_workers<J: Send + 'static, R: Send + 'static>(
    name: &str,
    jobs: std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<J>>>,
    done: std::sync::mpsc::Sender<R>,
    work: impl Fn(J) -> R + Clone + Send + 'static,
) -> Result<()> {
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    for _ in 0..workers {
        let (jobs, done, work) = (jobs.clone(), done.clone(), work.clone());
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Ok(job) = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                    if done.send(work(job)).is_err() {
                        return;
                    }
                }
            })
            .map_err(Error::BlobIo)?;
    }
    Ok(())
}

/// Plaintext gathered before a batch is hashed and sealed.
const BATCH: usize = 16 * CHUNK;

/// Encrypts a stream of plaintext into the blob format, hashing it for its id on the way, on the caller's
/// thread. The store uses it for blobs of one chunk, kept in the database; larger ones go to a file through
/// [`BlobFileSealer`].
pub struct BlobSealer<'k, W: Write> {
    _key: std::marker::PhantomData<&'k DataKey>,
    cipher: BlobCipher,
    out: W,
    index: u32,
    /// Plaintext not sealed yet; sealed a batch at a time, always keeping the last chunk back (it is sealed
    /// differently).
    pending: Vec<u8>,
    hasher: blake3::Hasher,
    size: u64,
    /// Whether a chunk has gone to `out` (a blob that fits one chunk can be kept inline instead).
    spilled: bool,
}

impl<'k, W: Write> BlobSealer<'k, W> {
    pub fn new(key: &'k DataKey, mut out: W) -> Result<Self> {
        let cipher = write_header(key, &mut out)?;
        Ok(BlobSealer {
            _key: std::marker::PhantomData,
            cipher,
            out,
            index: 0,
            pending: Vec::with_capacity(BATCH + CHUNK),
            hasher: key.hasher(),
            size: 0,
            spilled: false,
        })
    }

    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (BATCH + CHUNK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == BATCH + CHUNK {
                self.seal_batch(BATCH)?;
            }
        }
        Ok(())
    }

    /// Hashes and seals the first `n` pending bytes (whole chunks), all but the final chunk of the blob.
    fn seal_batch(&mut self, n: usize) -> Result<()> {
        self.hasher.update(&self.pending[..n]);
        for c in self.pending[..n].chunks(CHUNK) {
            let mut buf = Vec::with_capacity(CHUNK + TAG);
            buf.extend_from_slice(c);
            self.cipher
                .seal_in_place(self.index, false, b"", &mut buf)?;
            self.out.write_all(&buf).map_err(Error::BlobIo)?;
            self.index = self
                .index
                .checked_add(1)
                .ok_or_else(|| Error::Crypto("blob too large (over 2^32 chunks)".into()))?;
            self.spilled = true;
        }
        self.pending.drain(..n);
        Ok(())
    }

    /// Seals the last chunk; returns the output, the blob id (hex keyed BLAKE3 of the plaintext), the size,
    /// and whether the whole blob is one chunk.
    pub fn finish(mut self) -> Result<(W, String, u64, bool)> {
        // Everything but the final (possibly short or empty) chunk goes out as ordinary chunks.
        let whole = if self.pending.is_empty() {
            0
        } else {
            (self.pending.len() - 1) / CHUNK * CHUNK
        };
        if whole > 0 {
            self.seal_batch(whole)?;
        }
        let single = !self.spilled;
        self.hasher.update(&self.pending);
        let id = self.hasher.finalize().to_hex().to_string();
        // The last chunk authenticates the blob's id: a blob file put in place of another fails to open.
        let mut last = std::mem::take(&mut self.pending);
        self.cipher
            .seal_in_place(self.index, true, id.as_bytes(), &mut last)?;
        self.out.write_all(&last).map_err(Error::BlobIo)?;
        Ok((self.out, id, self.size, single))
    }
}

/// Decrypts a blob chunk by chunk (in parallel batches).
pub struct BlobOpener<'k, R: Read> {
    _key: std::marker::PhantomData<&'k DataKey>,
    cipher: BlobCipher,
    input: R,
    index: u32,
    /// Decrypted chunks ready to hand out, in order.
    ready: std::collections::VecDeque<Vec<u8>>,
    /// The next sealed chunk, read ahead so we know whether the current one is the last.
    next: Option<Vec<u8>>,
    done: bool,
    what: String,
    /// The id the blob must have (authenticated by its last chunk).
    id: String,
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<'k, R: Read> BlobOpener<'k, R> {
    /// Opens the blob `id` from `input`; `what` names it in errors.
    pub fn new(key: &'k DataKey, mut input: R, id: &str, what: &str) -> Result<Self> {
        let cipher = read_header(key, &mut input, what)?;
        let mut me = BlobOpener {
            _key: std::marker::PhantomData,
            cipher,
            input,
            index: 0,
            ready: Default::default(),
            next: None,
            done: false,
            what: what.to_owned(),
            id: id.to_owned(),
        };
        me.next = me.read_sealed()?;
        if me.next.is_none() {
            return Err(Error::Corrupt {
                what: what.to_owned(),
                message: "truncated: the final chunk is missing".into(),
            });
        }
        Ok(me)
    }

    fn read_sealed(&mut self) -> Result<Option<Vec<u8>>> {
        let mut buf = Vec::with_capacity(CHUNK + TAG);
        // `read_to_end` fills the spare capacity without zeroing it first.
        let n = (&mut self.input)
            .take((CHUNK + TAG) as u64)
            .read_to_end(&mut buf)
            .map_err(Error::BlobIo)?;
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(buf))
    }

    /// Reads up to 16 sealed chunks and decrypts them, on two cores when there are several.
    fn fill(&mut self) -> Result<()> {
        let mut batch: Vec<(u32, bool, Vec<u8>)> = Vec::with_capacity(16);
        while batch.len() < 16 {
            let Some(current) = self.next.take() else {
                break;
            };
            self.next = self.read_sealed()?;
            let last = self.next.is_none();
            batch.push((self.index + batch.len() as u32, last, current));
            if last {
                break;
            }
        }
        let cipher = &self.cipher;
        let id = self.id.as_bytes();
        let open = |part: &mut [(u32, bool, Vec<u8>)]| {
            part.iter_mut().find_map(|(i, last, c)| {
                let aad: &[u8] = if *last { id } else { b"" };
                (!cipher.open_in_place(*i, *last, aad, c)).then_some(*i)
            })
        };
        let failed = if batch.len() >= 4 {
            let mid = batch.len() / 2;
            let (a, b) = batch.split_at_mut(mid);
            std::thread::scope(|scope| {
                let other = scope.spawn(|| open(b));
                let first = open(a);
                first.or(other.join().unwrap_or(Some(u32::MAX)))
            })
        } else {
            open(&mut batch)
        };
        if let Some(i) = failed {
            return Err(Error::Corrupt {
                what: self.what.clone(),
                message: format!(
                    "chunk {i} fails authentication: the blob was altered, truncated or swapped for another"
                ),
            });
        }
        for (_, last, plain) in batch {
            self.index += 1;
            self.done |= last;
            self.ready.push_back(plain);
        }
        Ok(())
    }

    /// The next plaintext chunk; `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        if self.ready.is_empty() && !self.done {
            self.fill()?;
        }
        Ok(self.ready.pop_front())
    }

    /// Reads the whole plaintext.
    pub fn read_all(mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = self.next_chunk()? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }
}

/// Plaintext bytes per block of [`BlobFileSealer`] (1 MiB).
const PLAIN_BLOCK: usize = BLOCK_CHUNKS * CHUNK;

/// A block of plaintext on its way through [`BlobFileSealer`]'s threads: its place, its first chunk's index,
/// and its bytes (sealed in place on the way).
type SealWork = (u64, u32, Vec<u8>);

/// Encrypts a stream of plaintext into a blob file on threads of its own, for blobs larger than one chunk:
/// the caller gathers 1 MiB blocks; one thread hashes them in order (the blob's id), workers (one per core,
/// at most four) seal whole blocks in place as they come, and a writing thread puts them in the output in
/// order. At most [`AHEAD`] blocks are in flight, so a slow disk holds the caller back rather than filling
/// memory. The last chunk, which authenticates the id, is sealed by [`BlobFileSealer::finish`].
pub struct BlobFileSealer<W: Write + Send + 'static> {
    cipher: std::sync::Arc<BlobCipher>,
    /// Plaintext not yet sent: at most one block. It is sent only once more data arrives, because the
    /// blob's last chunk is sealed differently.
    pending: Vec<u8>,
    seq: u64,
    /// Index of the next chunk to be sent.
    chunks: u64,
    size: u64,
    to_hasher: Option<std::sync::mpsc::SyncSender<SealWork>>,
    hasher: Option<std::thread::JoinHandle<blake3::Hasher>>,
    to_writer: Option<std::sync::mpsc::Sender<SealWork>>,
    writer: Option<std::thread::JoinHandle<std::io::Result<W>>>,
    permits: std::sync::mpsc::SyncSender<()>,
}

impl<W: Write + Send + 'static> BlobFileSealer<W> {
    pub fn new(key: &DataKey, mut out: W) -> Result<Self> {
        use std::sync::{Arc, Mutex, mpsc};
        let cipher = Arc::new(write_header(key, &mut out)?);
        let (to_hasher, hasher_rx) = mpsc::sync_channel::<SealWork>(2);
        let (to_workers, workers_rx) = mpsc::sync_channel::<SealWork>(AHEAD);
        let workers_rx = Arc::new(Mutex::new(workers_rx));
        let (to_writer, writer_rx) = mpsc::channel::<SealWork>();
        let (permits, permits_rx) = mpsc::sync_channel::<()>(AHEAD);
        let mut hasher = key.hasher();
        let hasher = std::thread::Builder::new()
            .name("noa-blob-hash".into())
            .spawn(move || {
                while let Ok(work) = hasher_rx.recv() {
                    hasher.update(&work.2);
                    if to_workers.send(work).is_err() {
                        break;
                    }
                }
                hasher
            })
            .map_err(Error::BlobIo)?;
        let sealing = cipher.clone();
        spawn_workers(
            "noa-blob-seal",
            workers_rx,
            to_writer.clone(),
            move |(seq, first, mut block): SealWork| {
                // A block that cannot be sealed goes on empty: the writing thread stops there.
                if !seal_block(&sealing, first, &mut block) {
                    block.clear();
                }
                (seq, first, block)
            },
        )?;
        let writer = std::thread::Builder::new()
            .name("noa-blob-write".into())
            .spawn(move || {
                let mut early = std::collections::BTreeMap::new();
                let mut next = 0u64;
                while let Ok((seq, _, block)) = writer_rx.recv() {
                    early.insert(seq, block);
                    while let Some(block) = early.remove(&next) {
                        if block.is_empty() {
                            return Err(std::io::Error::other(format!(
                                "block {next} of the blob could not be sealed"
                            )));
                        }
                        out.write_all(&block)?;
                        next += 1;
                        // One block fewer in flight: the caller may send another.
                        let _ = permits_rx.try_recv();
                    }
                }
                if early.is_empty() {
                    Ok(out)
                } else {
                    Err(std::io::Error::other(format!(
                        "block {next} of the blob was never sealed"
                    )))
                }
            })
            .map_err(Error::BlobIo)?;
        Ok(BlobFileSealer {
            cipher,
            pending: Vec::with_capacity(BLOCK),
            seq: 0,
            chunks: 0,
            size: 0,
            to_hasher: Some(to_hasher),
            hasher: Some(hasher),
            to_writer: Some(to_writer),
            writer: Some(writer),
            permits,
        })
    }

    pub fn write(&mut self, mut data: &[u8]) -> Result<()> {
        self.size += data.len() as u64;
        while !data.is_empty() {
            if self.pending.len() == PLAIN_BLOCK {
                // More data follows, so none of these chunks is the last.
                self.send_pending(PLAIN_BLOCK)?;
            }
            let take = (PLAIN_BLOCK - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        Ok(())
    }

    /// Sends the first `n` pending bytes (whole chunks) down the pipeline.
    fn send_pending(&mut self, n: usize) -> Result<()> {
        let first = u32::try_from(self.chunks)
            .ok()
            .filter(|f| f.checked_add((n / CHUNK) as u32).is_some())
            .ok_or_else(|| Error::Crypto("blob too large (over 2^32 chunks)".into()))?;
        let mut block = std::mem::replace(&mut self.pending, Vec::with_capacity(BLOCK));
        self.pending.extend_from_slice(&block[n..]);
        block.truncate(n);
        // Blocks while AHEAD blocks are on their way to the disk; fails if the writing thread has stopped.
        let sent = self.permits.send(()).is_ok()
            && self
                .to_hasher
                .as_ref()
                .is_some_and(|h| h.send((self.seq, first, block)).is_ok());
        if !sent {
            return Err(self.stopped());
        }
        self.seq += 1;
        self.chunks += (n / CHUNK) as u64;
        Ok(())
    }

    /// The error that stopped the pipeline (the writing thread's, usually a full disk).
    fn stopped(&mut self) -> Error {
        self.to_hasher = None;
        self.to_writer = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => Error::BlobIo(e),
            _ => Error::Crypto("the blob's sealing threads stopped".into()),
        }
    }

    /// Seals the last chunk and waits for everything to be written; returns the output, the blob id (hex
    /// keyed BLAKE3 of the plaintext) and the size.
    pub fn finish(mut self) -> Result<(W, String, u64)> {
        let whole = if self.pending.is_empty() {
            0
        } else {
            (self.pending.len() - 1) / CHUNK * CHUNK
        };
        if whole > 0 {
            self.send_pending(whole)?;
        }
        // Closing the hasher's input ends its thread once it has hashed every block sent.
        self.to_hasher = None;
        let Some(Ok(mut hasher)) = self.hasher.take().map(|h| h.join()) else {
            return Err(self.stopped());
        };
        hasher.update(&self.pending);
        let id = hasher.finalize().to_hex().to_string();
        let index = u32::try_from(self.chunks)
            .map_err(|_| Error::Crypto("blob too large (over 2^32 chunks)".into()))?;
        let mut last = std::mem::take(&mut self.pending);
        self.cipher
            .seal_in_place(index, true, id.as_bytes(), &mut last)?;
        let sent = self
            .to_writer
            .take()
            .is_some_and(|w| w.send((self.seq, index, last)).is_ok());
        let writer = self.writer.take();
        let out = match writer.map(|w| w.join()) {
            Some(Ok(Ok(out))) if sent => out,
            Some(Ok(Err(e))) => return Err(Error::BlobIo(e)),
            _ => return Err(Error::Crypto("the blob's sealing threads stopped".into())),
        };
        Ok((out, id, self.size))
    }
}

/// Seals a block of whole plaintext chunks in place: moves each chunk to its sealed position (from the
/// back, so nothing is overwritten before it moves), then encrypts it and writes its tag after it. False if
/// the cipher refuses (it cannot for chunks this small).
fn seal_block(cipher: &BlobCipher, first: u32, block: &mut Vec<u8>) -> bool {
    let chunks = block.len() / CHUNK;
    block.resize(chunks * SEALED, 0);
    for i in (0..chunks).rev() {
        block.copy_within(i * CHUNK..(i + 1) * CHUNK, i * SEALED);
    }
    for i in 0..chunks {
        let at = i * SEALED;
        // The caller checked that the indices fit in u32.
        let index = first + i as u32;
        let Ok(tag) = cipher.0.encrypt_in_place_detached(
            &BlobCipher::nonce(index, false),
            b"",
            &mut block[at..at + CHUNK],
        ) else {
            return false;
        };
        block[at + CHUNK..at + SEALED].copy_from_slice(&tag);
    }
    true
}

/// Sealed chunks per block of [`BlobFileOpener`] (about 1 MiB).
const BLOCK_CHUNKS: usize = 16;
/// Bytes of one sealed chunk that is not the last.
const SEALED: usize = CHUNK + TAG;
/// Bytes of one full block.
pub const BLOCK: usize = BLOCK_CHUNKS * SEALED;
/// Blocks read or decrypted ahead of the caller.
const AHEAD: usize = 6;

/// One block on its way from the reading thread to a decrypting one.
struct Work {
    seq: u64,
    last: bool,
    block: Vec<u8>,
}

/// A block's plaintext (or why there is none), with its place in the blob and whether it is the last.
type Opened = (u64, bool, Result<Vec<u8>>);

/// Decrypts a blob file on threads of its own, for files larger than one block: one thread reads blocks of
/// whole sealed chunks, workers (one per core, at most four) each decrypt a whole block in place as soon as
/// one is read, with no barrier between them, and the caller receives plaintext in order, a block at a time.
/// At most [`AHEAD`] blocks are in flight, so a slow caller holds the disk back rather than filling memory.
/// Dropping the opener stops its threads.
pub struct BlobFileOpener {
    results: std::sync::mpsc::Receiver<Opened>,
    permits: std::sync::mpsc::Receiver<()>,
    /// Blocks that arrived before the one due next.
    early: std::collections::BTreeMap<u64, (bool, Result<Vec<u8>>)>,
    next: u64,
    done: bool,
    what: String,
}

impl BlobFileOpener {
    /// Opens the blob `id` from `file`; `what` names it in errors.
    pub fn new(key: &DataKey, mut file: std::fs::File, id: &str, what: &str) -> Result<Self> {
        use std::sync::{Arc, Mutex, mpsc};
        let cipher = Arc::new(read_header(key, &mut file, what)?);
        let (work_tx, work_rx) = mpsc::sync_channel::<Work>(AHEAD);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (results_tx, results) = mpsc::channel::<Opened>();
        let (permit_tx, permits) = mpsc::sync_channel::<()>(AHEAD);
        let (id_owned, what_owned) = (id.to_owned(), what.to_owned());
        spawn_workers(
            "noa-blob-open",
            work_rx,
            results_tx.clone(),
            move |Work {
                      seq,
                      last,
                      mut block,
                  }| {
                let first = seq * BLOCK_CHUNKS as u64;
                let opened = open_block(&cipher, first, last, id_owned.as_bytes(), &mut block)
                    .map(|()| block)
                    .map_err(|message| Error::Corrupt {
                        what: what_owned.clone(),
                        message,
                    });
                (seq, last, opened)
            },
        )?;
        let what_read = what.to_owned();
        std::thread::Builder::new()
            .name("noa-blob-read".into())
            .spawn(move || read_blocks(file, permit_tx, work_tx, results_tx, what_read))
            .map_err(Error::BlobIo)?;
        Ok(BlobFileOpener {
            results,
            permits,
            early: Default::default(),
            next: 0,
            done: false,
            what: what.to_owned(),
        })
    }

    /// The next piece of plaintext (up to one block); `None` after the last.
    pub fn next_block(&mut self) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        loop {
            if let Some((last, opened)) = self.early.remove(&self.next) {
                self.next += 1;
                // One block fewer in flight: the reader may read another.
                let _ = self.permits.try_recv();
                self.done = last || opened.is_err();
                return opened.map(Some);
            }
            match self.results.recv() {
                Ok((seq, last, opened)) => {
                    self.early.insert(seq, (last, opened));
                }
                Err(_) => {
                    self.done = true;
                    return Err(Error::Corrupt {
                        what: self.what.clone(),
                        message: format!(
                            "reading stopped before block {} was decrypted",
                            self.next
                        ),
                    });
                }
            }
        }
    }
}

/// The reading thread of [`BlobFileOpener`]: whole blocks, each sent once it is known whether it is the last.
fn read_blocks(
    mut file: std::fs::File,
    permits: std::sync::mpsc::SyncSender<()>,
    work: std::sync::mpsc::SyncSender<Work>,
    results: std::sync::mpsc::Sender<Opened>,
    what: String,
) {
    let mut seq = 0u64;
    let mut held: Option<Vec<u8>> = None;
    loop {
        // Blocks while AHEAD blocks are read but not yet taken by the caller; fails once it has gone.
        if permits.send(()).is_err() {
            return;
        }
        let mut block = Vec::with_capacity(BLOCK);
        // `read_to_end` fills the spare capacity without zeroing it first.
        let n = match (&mut file).take(BLOCK as u64).read_to_end(&mut block) {
            Ok(n) => n,
            Err(e) => {
                let _ = results.send((seq, true, Err(Error::BlobIo(e))));
                return;
            }
        };
        match held.take() {
            Some(prev) => {
                let last = n == 0;
                if work
                    .send(Work {
                        seq,
                        last,
                        block: prev,
                    })
                    .is_err()
                    || last
                {
                    return;
                }
                seq += 1;
            }
            None if n == 0 => {
                let _ = results.send((
                    seq,
                    true,
                    Err(Error::Corrupt {
                        what,
                        message: "truncated: the final chunk is missing".into(),
                    }),
                ));
                return;
            }
            None => {}
        }
        if n > 0 && n < BLOCK {
            let _ = work.send(Work {
                seq,
                last: true,
                block,
            });
            return;
        }
        held = (n > 0).then_some(block);
    }
}

/// Decrypts one block in place and moves the plaintexts together (dropping the tags); the error names the
/// first chunk that fails.
fn open_block(
    cipher: &BlobCipher,
    first: u64,
    last: bool,
    id: &[u8],
    block: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    let chunks = block.len().div_ceil(SEALED);
    let mut plain = 0;
    for i in 0..chunks {
        let index = first + i as u64;
        let from = i * SEALED;
        let len = (block.len() - from).min(SEALED);
        let final_chunk = last && i + 1 == chunks;
        let Ok(index32) = u32::try_from(index) else {
            return Err(format!(
                "chunk {index} is past the largest blob (2^32 chunks)"
            ));
        };
        if len < TAG || (!final_chunk && len < SEALED) {
            return Err(format!("truncated: chunk {index} is {len} bytes"));
        }
        let at = from + len - TAG;
        let tag = chacha20poly1305::Tag::clone_from_slice(&block[at..from + len]);
        let aad: &[u8] = if final_chunk { id } else { b"" };
        cipher
            .0
            .decrypt_in_place_detached(
                &BlobCipher::nonce(index32, final_chunk),
                aad,
                &mut block[from..at],
                &tag,
            )
            .map_err(|_| {
                format!(
                    "chunk {index} fails authentication: the blob was altered, truncated or swapped for another"
                )
            })?;
        block.copy_within(from..at, plain);
        plain += at - from;
    }
    block.truncate(plain);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> DataKey {
        DataKey::new([7u8; 32])
    }

    fn roundtrip(data: &[u8]) -> Vec<u8> {
        let k = key();
        let mut s = BlobSealer::new(&k, Vec::new()).unwrap();
        s.write(data).unwrap();
        let (out, id, size, _) = s.finish().unwrap();
        assert_eq!(size, data.len() as u64);
        BlobOpener::new(&k, &out[..], &id, "t")
            .unwrap()
            .read_all()
            .unwrap()
    }

    #[test]
    fn blobs_roundtrip_at_chunk_edges() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            assert_eq!(roundtrip(&data), data, "length {len}");
        }
    }

    #[test]
    fn truncation_and_tampering_are_detected() {
        let k = key();
        let data = vec![1u8; 2 * CHUNK + 10];
        let mut s = BlobSealer::new(&k, Vec::new()).unwrap();
        s.write(&data).unwrap();
        let (out, id, ..) = s.finish().unwrap();
        // Cut at a chunk boundary: the remaining last chunk was not sealed as last.
        let cut = &out[..HEADER + CHUNK + TAG];
        let err = BlobOpener::new(&k, cut, &id, "b")
            .unwrap()
            .read_all()
            .unwrap_err();
        assert!(err.to_string().contains("fails authentication"), "{err}");
        let mut flipped = out.clone();
        flipped[HEADER + 5] ^= 1;
        let err = BlobOpener::new(&k, &flipped[..], &id, "b")
            .unwrap()
            .read_all()
            .unwrap_err();
        assert!(err.to_string().contains("chunk 0"), "{err}");
        // Another blob's file in this one's place.
        let err = BlobOpener::new(&k, &out[..], &"0".repeat(64), "b")
            .unwrap()
            .read_all()
            .unwrap_err();
        assert!(err.to_string().contains("swapped"), "{err}");
        assert!(
            BlobOpener::new(&DataKey::new([8u8; 32]), &out[..], &id, "b")
                .unwrap()
                .read_all()
                .is_err()
        );
    }

    fn seal_threaded(k: &DataKey, data: &[u8], piece: usize) -> (Vec<u8>, String) {
        let mut s = BlobFileSealer::new(k, Vec::new()).unwrap();
        for p in data.chunks(piece.max(1)) {
            s.write(p).unwrap();
        }
        let (out, id, size) = s.finish().unwrap();
        assert_eq!(size, data.len() as u64);
        (out, id)
    }

    fn open_threaded(k: &DataKey, sealed: &[u8], id: &str) -> Result<Vec<u8>> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(sealed).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let mut o = BlobFileOpener::new(k, f, id, "file t")?;
        let mut out = Vec::new();
        while let Some(b) = o.next_block()? {
            assert!(b.len() <= PLAIN_BLOCK);
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    #[test]
    fn threaded_sealing_and_opening_agree_with_the_plain_format() {
        let k = key();
        for len in [
            CHUNK + 1,
            PLAIN_BLOCK - 1,
            PLAIN_BLOCK,
            PLAIN_BLOCK + 1,
            2 * PLAIN_BLOCK,
            2 * PLAIN_BLOCK + CHUNK,
            3 * PLAIN_BLOCK + 17,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            // Sealed on threads (in odd-sized writes), opened both ways.
            let (sealed, id) = seal_threaded(&k, &data, 7777);
            let plain = BlobOpener::new(&k, &sealed[..], &id, "t").unwrap();
            assert_eq!(plain.read_all().unwrap(), data, "length {len}");
            assert_eq!(
                open_threaded(&k, &sealed, &id).unwrap(),
                data,
                "length {len}"
            );
            // Sealed plainly: the same id, and the threaded opener reads it.
            let mut s = BlobSealer::new(&k, Vec::new()).unwrap();
            s.write(&data).unwrap();
            let (sealed, plain_id, ..) = s.finish().unwrap();
            assert_eq!(plain_id, id, "length {len}");
            assert_eq!(
                open_threaded(&k, &sealed, &id).unwrap(),
                data,
                "length {len}"
            );
        }
    }

    #[test]
    fn the_threaded_opener_detects_truncation_and_tampering() {
        let k = key();
        let data = vec![3u8; 2 * PLAIN_BLOCK + PLAIN_BLOCK / 2];
        let (sealed, id) = seal_threaded(&k, &data, 1 << 20);
        let err = |bytes: &[u8], id: &str| open_threaded(&k, bytes, id).unwrap_err().to_string();
        // Cut at a block boundary, and inside a block: what is left ends in a chunk not sealed as last.
        let e = err(&sealed[..HEADER + BLOCK], &id);
        assert!(e.contains("chunk 15 fails authentication"), "{e}");
        let e = err(&sealed[..HEADER + BLOCK + 3 * SEALED], &id);
        assert!(e.contains("chunk 18 fails authentication"), "{e}");
        let e = err(&sealed[..HEADER + BLOCK + 3 * SEALED + 5], &id);
        assert!(e.contains("truncated: chunk 19 is 5 bytes"), "{e}");
        let mut flipped = sealed.clone();
        flipped[HEADER + BLOCK + 2 * SEALED + 9] ^= 1;
        let e = err(&flipped, &id);
        assert!(e.contains("file t"), "{e}");
        assert!(e.contains("chunk 18 fails authentication"), "{e}");
        let e = err(&sealed, &"0".repeat(64));
        assert!(e.contains("swapped"), "{e}");
        let e = err(&sealed[..HEADER], &id);
        assert!(e.contains("the final chunk is missing"), "{e}");
        let e = err(b"NOPE", &id);
        assert!(e.contains("bad header"), "{e}");
        // Dropped halfway, the opener's threads stop (the test would hang otherwise).
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&sealed).unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        let mut o = BlobFileOpener::new(&k, f, &id, "t").unwrap();
        assert_eq!(o.next_block().unwrap().unwrap().len(), PLAIN_BLOCK);
        drop(o);
    }

    #[test]
    fn ids_are_keyed_and_stable() {
        let a = key();
        let id = |k: &DataKey| {
            let mut s = BlobSealer::new(k, Vec::new()).unwrap();
            s.write(b"hello").unwrap();
            s.finish().unwrap().1
        };
        assert_eq!(id(&a), id(&a));
        assert_ne!(id(&a), id(&DataKey::new([9u8; 32])));
        assert_ne!(id(&a), blake3::hash(b"hello").to_hex().to_string());
    }

    #[test]
    fn secrets_are_bound_to_their_name() {
        let k = key();
        let s = k.seal_secret("a", b"v").unwrap();
        assert_eq!(k.open_secret("a", &s).unwrap(), b"v");
        assert!(k.open_secret("b", &s).is_none());
    }

    proptest! {
        // Few cases: each seals up to three chunks, and the crate is unoptimized in tests.
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn any_bytes_roundtrip(data in proptest::collection::vec(any::<u8>(), 0..200_000)) {
            prop_assert_eq!(roundtrip(&data), data);
        }

        #[test]
        fn the_threaded_opener_never_panics_on_damage(
            cut in 0usize..(3 * BLOCK),
            flip in proptest::option::of((0usize..(3 * BLOCK), 1u8..=255)),
            junk in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            // A valid blob of two and a half blocks, maybe cut short, a byte flipped, junk appended: the opener
            // gives back the plaintext when nothing was damaged and an error otherwise, never a panic.
            let k = key();
            let data = vec![5u8; 2 * PLAIN_BLOCK + PLAIN_BLOCK / 2];
            let (mut sealed, id) = seal_threaded(&k, &data, 1 << 20);
            let whole = sealed.len();
            let mut damaged = cut < whole || !junk.is_empty();
            sealed.truncate(cut.min(whole));
            if let Some((at, x)) = flip
                && at < sealed.len()
            {
                sealed[at] ^= x;
                damaged = true;
            }
            sealed.extend_from_slice(&junk);
            match open_threaded(&k, &sealed, &id) {
                Ok(plain) => prop_assert!(!damaged && plain == data),
                Err(_) => prop_assert!(damaged),
            }
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let k = key();
            if let Ok(o) = BlobOpener::new(&k, &data[..], "g", "g") {
                let _ = o.read_all();
            }
        }
    }
}
