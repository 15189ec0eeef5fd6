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
//! Large blobs use both cores: the content hash runs beside the encryption, batches of chunks are decrypted
//! in parallel, and a writeback thread starts flushing a blob file to disk while it is still being written. A chunk cannot be moved, dropped or appended to without
//! failing authentication, and a truncated blob is detected because its final chunk was not sealed as last.

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

/// Plaintext gathered before a batch is hashed and sealed (on two cores when it is this large).
const BATCH: usize = 16 * CHUNK;

/// Encrypts a stream of plaintext into the blob format, hashing it for its id on the way.
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
        let mut salt = [0u8; 16];
        getrandom::fill(&mut salt).map_err(|e| Error::Crypto(format!("no randomness: {e}")))?;
        out.write_all(MAGIC).map_err(Error::BlobIo)?;
        out.write_all(&salt).map_err(Error::BlobIo)?;
        Ok(BlobSealer {
            _key: std::marker::PhantomData,
            cipher: key.blob_cipher(&salt),
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
        let (head, _) = self.pending.split_at(n);
        let cipher = &self.cipher;
        let first = self.index;
        let hasher = &mut self.hasher;
        // The content hash runs on a second core while this one encrypts.
        let seal = |from: usize, chunks: &[u8]| -> Result<Vec<Vec<u8>>> {
            chunks
                .chunks(CHUNK)
                .enumerate()
                .map(|(i, c)| {
                    let mut buf = Vec::with_capacity(CHUNK + TAG);
                    buf.extend_from_slice(c);
                    cipher.seal_in_place(first + (from + i) as u32, false, b"", &mut buf)?;
                    Ok(buf)
                })
                .collect()
        };
        let chunks = n / CHUNK;
        let sealed: Result<Vec<Vec<u8>>> = if chunks >= 4 {
            // Two cores: this one seals about three quarters of the chunks; the other hashes the whole batch
            // (about half the cost of sealing it) and seals the rest.
            let mine = (chunks * 3).div_ceil(4);
            let (a, b) = head.split_at(mine * CHUNK);
            std::thread::scope(|scope| {
                let other = scope.spawn(|| {
                    hasher.update(head);
                    seal(mine, b)
                });
                let mut out = seal(0, a)?;
                let rest = other
                    .join()
                    .map_err(|_| Error::Crypto("the sealing thread panicked".into()))??;
                out.extend(rest);
                Ok(out)
            })
        } else {
            hasher.update(head);
            seal(0, head)
        };
        for chunk in sealed? {
            self.out.write_all(&chunk).map_err(Error::BlobIo)?;
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
        let mut header = [0u8; HEADER];
        let n = read_full(&mut input, &mut header).map_err(Error::BlobIo)?;
        let corrupt = || Error::Corrupt {
            what: what.to_owned(),
            message: "not a NOA blob (bad header)".into(),
        };
        if n < HEADER || &header[..MAGIC.len()] != MAGIC {
            return Err(corrupt());
        }
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&header[MAGIC.len()..]);
        let mut me = BlobOpener {
            _key: std::marker::PhantomData,
            cipher: key.blob_cipher(&salt),
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
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let k = key();
            if let Ok(o) = BlobOpener::new(&k, &data[..], "g", "g") {
                let _ = o.read_all();
            }
        }
    }
}
