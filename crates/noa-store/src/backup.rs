//! Online backups: one tar archive with a consistent database snapshot, the blobs it references, and a manifest.
//!
//! The snapshot comes from SQLite's online backup API in a single step (one read transaction), so writers
//! keep going and the copy is consistent. Blob files are immutable and named by content, so copying the
//! ones the snapshot references after the snapshot is safe. Entries are hashed with BLAKE3 as they are
//! written; `MANIFEST.json`, the last entry, lists every entry with its size and hash. [`verify`] rehashes
//! every entry, checks the snapshot's integrity and that every blob it references is in the archive;
//! [`restore`] does the same while extracting into a temporary folder and renames it into place only at
//! the end, so a failed restore leaves nothing behind. Keys are left out unless asked for: an archive
//! without them cannot be read without the store's key file or passphrase.

use crate::{Error, Result, Store};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "noa-backup-1";
pub const MANIFEST: &str = "MANIFEST.json";

/// The manifest at the end of every archive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub created_ms: u64,
    pub schema_version: u32,
    /// The id of the key that unlocks the data key, and its kind (`file` or `passphrase`).
    pub key_id: String,
    pub key_kind: String,
    /// The node key that signed the audit checkpoints (hex public key).
    pub node_key: String,
    pub includes_keys: bool,
    pub entries: Vec<ManifestEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

fn berr(path: &Path, message: impl Into<String>) -> Error {
    Error::Backup {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A reader that hashes what passes through and reports progress.
struct Hashing<'p, R> {
    inner: R,
    hasher: blake3::Hasher,
    progress: &'p mut dyn FnMut(u64),
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        (self.progress)(n as u64);
        Ok(n)
    }
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o600);
    h.set_mtime(noa_types::now_ms() / 1000);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    name: &str,
    size: u64,
    reader: impl Read,
    progress: &mut dyn FnMut(u64),
    entries: &mut Vec<ManifestEntry>,
    out_path: &Path,
) -> Result<()> {
    let mut h = header(size);
    let mut r = Hashing {
        inner: reader.take(size),
        hasher: blake3::Hasher::new(),
        progress,
    };
    tar.append_data(&mut h, name, &mut r)
        .map_err(|e| berr(out_path, format!("writing {name}: {e}")))?;
    entries.push(ManifestEntry {
        path: name.to_owned(),
        size,
        blake3: r.hasher.finalize().to_hex().to_string(),
    });
    Ok(())
}

/// Progress of a long backup operation: bytes done and the total expected.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

impl Store {
    /// Bytes a backup will hold, roughly (database plus blob files), for progress bars.
    pub fn backup_estimate(&self) -> u64 {
        let mut total = std::fs::metadata(self.path()).map(|m| m.len()).unwrap_or(0);
        if let Ok(conn) = self.own_connection()
            && let Ok(n) = conn.query_row(
                "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE inline IS NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
        {
            total += n as u64;
        }
        total
    }

    /// Writes a consistent backup of the running store to `out`. `out_name` only names it in errors.
    pub fn backup_to(
        &self,
        out: impl Write,
        out_name: &Path,
        include_keys: bool,
        progress: Progress<'_>,
    ) -> Result<Manifest> {
        let total = self.backup_estimate();
        let mut done = 0u64;
        let mut tick = |n: u64| {
            done += n;
            progress(done, total.max(done));
        };
        let staging = tempfile::Builder::new()
            .prefix(".backup-")
            .tempdir_in(self.dir())
            .map_err(|e| berr(out_name, format!("cannot stage the snapshot: {e}")))?;
        let snap_path = staging.path().join("noa.db");
        {
            let src = self.own_connection()?;
            let mut dst = rusqlite::Connection::open(&snap_path)?;
            let b = rusqlite::backup::Backup::new(&src, &mut dst)?;
            // One step copies every page inside one read transaction: a consistent snapshot.
            b.step(-1)?;
        }
        let snap = rusqlite::Connection::open(&snap_path)?;
        snap.pragma_update(None, "journal_mode", "DELETE")?;
        let schema_version: u32 = snap.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )?;
        let (key_id, key_kind): (String, String) = snap.query_row(
            "SELECT kek_id, kek_kind FROM keyring WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let blob_ids: Vec<String> = {
            let mut st = snap.prepare("SELECT id FROM blobs WHERE inline IS NULL ORDER BY id")?;
            st.query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        drop(snap);
        let mut tar = tar::Builder::new(out);
        let mut entries = Vec::new();
        let snap_size = std::fs::metadata(&snap_path)
            .map_err(|e| berr(out_name, e.to_string()))?
            .len();
        let f = std::fs::File::open(&snap_path).map_err(|e| berr(out_name, e.to_string()))?;
        append(
            &mut tar,
            "noa.db",
            snap_size,
            f,
            &mut tick,
            &mut entries,
            out_name,
        )?;
        let blobs_dir = self.dir().join("blobs");
        for id in &blob_ids {
            let p = crate::vfs::blob_path(&blobs_dir, id);
            let f = std::fs::File::open(&p).map_err(|e| {
                berr(
                    out_name,
                    format!("blob {id} referenced by the store is unreadable: {e}"),
                )
            })?;
            let size = f
                .metadata()
                .map_err(|e| berr(out_name, e.to_string()))?
                .len();
            let name = format!("blobs/{}/{}", id.get(..2).unwrap_or(id), id);
            append(&mut tar, &name, size, f, &mut tick, &mut entries, out_name)?;
        }
        let mut extras = vec!["policy.cedar", "noa.toml"];
        if include_keys {
            extras.extend(["store.key", "node.key"]);
        }
        for name in extras {
            let p = self.dir().join(name);
            if let Ok(f) = std::fs::File::open(&p) {
                let size = f
                    .metadata()
                    .map_err(|e| berr(out_name, e.to_string()))?
                    .len();
                append(&mut tar, name, size, f, &mut tick, &mut entries, out_name)?;
            }
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            created_ms: noa_types::now_ms(),
            schema_version,
            key_id,
            key_kind,
            node_key: self.node_public_key(),
            includes_keys: include_keys,
            entries,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| berr(out_name, format!("manifest: {e}")))?;
        let mut h = header(json.len() as u64);
        tar.append_data(&mut h, MANIFEST, &json[..])
            .map_err(|e| berr(out_name, format!("writing the manifest: {e}")))?;
        let mut out = tar
            .into_inner()
            .map_err(|e| berr(out_name, format!("finishing the archive: {e}")))?;
        out.flush().map_err(|e| berr(out_name, e.to_string()))?;
        Ok(manifest)
    }

    /// Writes a backup to a file, atomically (a temporary file renamed into place once complete).
    pub fn backup_to_file(
        &self,
        path: &Path,
        include_keys: bool,
        progress: Progress<'_>,
    ) -> Result<Manifest> {
        let tmp = path.with_extension("partial");
        let f = std::fs::File::create(&tmp).map_err(|e| berr(path, e.to_string()))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let result = self.backup_to(&mut w, path, include_keys, progress);
        let result = result.and_then(|m| {
            let f = w
                .into_inner()
                .map_err(|e| berr(path, e.into_error().to_string()))?;
            f.sync_all().map_err(|e| berr(path, e.to_string()))?;
            std::fs::rename(&tmp, path).map_err(|e| berr(path, e.to_string()))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::crypto::sync_dir(dir);
            }
            Ok(m)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Reads an archive, hashing every entry; with `extract_to`, writes entries there too.
fn read_archive(
    archive: &Path,
    extract_to: Option<&Path>,
    progress: Progress<'_>,
) -> Result<Manifest> {
    let file = std::fs::File::open(archive).map_err(|e| berr(archive, e.to_string()))?;
    let total = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut done = 0u64;
    let mut tar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut seen: Vec<ManifestEntry> = Vec::new();
    let mut manifest: Option<Manifest> = None;
    let mut created_dirs: Vec<PathBuf> = Vec::new();
    let entries = tar
        .entries()
        .map_err(|e| berr(archive, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            berr(
                archive,
                format!("corrupt or truncated after {} entries: {e}", seen.len()),
            )
        })?;
        let name = entry
            .path()
            .map_err(|e| berr(archive, format!("bad entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        if manifest.is_some() {
            return Err(berr(
                archive,
                format!("entry {name} follows the manifest, which must be last"),
            ));
        }
        if name == MANIFEST {
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|e| berr(archive, format!("reading the manifest: {e}")))?;
            let m: Manifest = serde_json::from_slice(&buf)
                .map_err(|e| berr(archive, format!("the manifest is invalid: {e}")))?;
            if m.format != FORMAT {
                return Err(berr(
                    archive,
                    format!("unknown format {:?} (this noa reads {FORMAT})", m.format),
                ));
            }
            manifest = Some(m);
            continue;
        }
        // Only the names this format writes: never an absolute path or one that climbs out.
        let safe = !name.starts_with('/')
            && !name.split('/').any(|c| c == ".." || c.is_empty())
            && (name == "noa.db"
                || name.starts_with("blobs/")
                || matches!(
                    name.as_str(),
                    "policy.cedar" | "noa.toml" | "store.key" | "node.key"
                ));
        if !safe {
            return Err(berr(archive, format!("unexpected entry {name:?}")));
        }
        let mut sink: Option<std::io::BufWriter<std::fs::File>> = match extract_to {
            Some(dir) => {
                let p = dir.join(&name);
                if let Some(parent) = p.parent()
                    && !parent.exists()
                {
                    std::fs::create_dir_all(parent).map_err(|e| berr(&p, e.to_string()))?;
                    created_dirs.push(parent.to_owned());
                }
                Some(std::io::BufWriter::with_capacity(
                    1 << 20,
                    std::fs::File::create(&p).map_err(|e| berr(&p, e.to_string()))?,
                ))
            }
            None => None,
        };
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = entry.read(&mut buf).map_err(|e| {
                berr(
                    archive,
                    format!("entry {name} is truncated or unreadable: {e}"),
                )
            })?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            if let Some(sink) = &mut sink {
                sink.write_all(&buf[..n])
                    .map_err(|e| berr(archive, format!("extracting {name}: {e}")))?;
            }
            size += n as u64;
            done += n as u64;
            progress(done, total.max(done));
        }
        if let Some(sink) = sink {
            // Restored files must be on disk before the restore says it is done.
            sink.into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(|e| berr(archive, format!("extracting {name}: {e}")))?;
        }
        seen.push(ManifestEntry {
            path: name,
            size,
            blake3: hasher.finalize().to_hex().to_string(),
        });
    }
    for d in created_dirs.iter().rev() {
        crate::crypto::sync_dir(d);
        if let Some(parent) = d.parent() {
            crate::crypto::sync_dir(parent);
        }
    }
    let manifest = manifest.ok_or_else(|| {
        berr(
            archive,
            format!(
                "the archive is truncated or not a NOA backup: {MANIFEST} is missing (read {} entries)",
                seen.len()
            ),
        )
    })?;
    if seen.len() != manifest.entries.len() {
        return Err(berr(
            archive,
            format!(
                "the manifest lists {} entries but the archive holds {}",
                manifest.entries.len(),
                seen.len()
            ),
        ));
    }
    for (want, got) in manifest.entries.iter().zip(&seen) {
        if want.path != got.path {
            return Err(berr(
                archive,
                format!(
                    "entry {} is where the manifest expects {}",
                    got.path, want.path
                ),
            ));
        }
        if want.size != got.size || want.blake3 != got.blake3 {
            return Err(berr(
                archive,
                format!(
                    "entry {} is corrupt: its BLAKE3 hash or size differs from the manifest",
                    got.path
                ),
            ));
        }
    }
    Ok(manifest)
}

/// Checks the database snapshot of an extracted archive: integrity, and every blob file present.
fn check_snapshot(archive: &Path, dir: &Path, m: &Manifest) -> Result<()> {
    let conn = rusqlite::Connection::open_with_flags(
        dir.join("noa.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .map_err(|e| berr(archive, format!("the database snapshot does not open: {e}")))?;
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| berr(archive, format!("the database snapshot is damaged: {e}")))?;
    if ok != "ok" {
        return Err(berr(
            archive,
            format!("the database snapshot fails its integrity check: {ok}"),
        ));
    }
    let mut st = conn.prepare("SELECT id FROM blobs WHERE inline IS NULL")?;
    let ids = st
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let have: std::collections::HashSet<&str> = m.entries.iter().map(|e| e.path.as_str()).collect();
    for id in ids {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(berr(
                archive,
                format!(
                    "the snapshot names a blob {:?} that is not a 64-digit hex id",
                    id.chars().take(80).collect::<String>()
                ),
            ));
        }
        let name = format!("blobs/{}/{}", &id[..2], id);
        if !have.contains(name.as_str()) {
            return Err(berr(
                archive,
                format!("blob {id} is referenced by the snapshot but missing from the archive"),
            ));
        }
    }
    Ok(())
}

/// Reads only the manifest of an archive (the last entry), without checking hashes.
pub fn read_manifest(archive: &Path) -> Result<Manifest> {
    let file = std::fs::File::open(archive).map_err(|e| berr(archive, e.to_string()))?;
    let mut tar = tar::Archive::new(std::io::BufReader::new(file));
    let entries = tar
        .entries()
        .map_err(|e| berr(archive, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| berr(archive, format!("corrupt: {e}")))?;
        let is_manifest = entry
            .path()
            .map(|p| p.as_os_str() == MANIFEST)
            .unwrap_or(false);
        if is_manifest {
            let mut buf = Vec::new();
            entry
                .read_to_end(&mut buf)
                .map_err(|e| berr(archive, e.to_string()))?;
            return serde_json::from_slice(&buf)
                .map_err(|e| berr(archive, format!("the manifest is invalid: {e}")));
        }
    }
    Err(berr(archive, format!("{MANIFEST} is missing")))
}

/// Checks every hash in an archive and the snapshot inside it.
pub fn verify(archive: &Path, progress: Progress<'_>) -> Result<Manifest> {
    let scratch = tempfile::tempdir().map_err(|e| berr(archive, e.to_string()))?;
    // Only the database is extracted (to check it); blobs are hashed as they stream past.
    let m = read_archive_db_only(archive, scratch.path(), progress)?;
    check_snapshot(archive, scratch.path(), &m)?;
    Ok(m)
}

fn read_archive_db_only(
    archive: &Path,
    scratch: &Path,
    progress: Progress<'_>,
) -> Result<Manifest> {
    // Extract into the scratch folder, then drop everything but the database: blobs are not needed.
    let m = read_archive(archive, Some(scratch), progress)?;
    let _ = std::fs::remove_dir_all(scratch.join("blobs"));
    Ok(m)
}

/// Restores an archive into `target`, which must not exist or be empty. `key_file` supplies the store key
/// when the archive was made without keys; it must be the key the archive's store needs.
pub fn restore(
    archive: &Path,
    target: &Path,
    key_file: Option<&Path>,
    progress: Progress<'_>,
) -> Result<Manifest> {
    if target.exists() {
        let empty = std::fs::read_dir(target)
            .map_err(|e| berr(target, e.to_string()))?
            .next()
            .is_none();
        if !empty {
            return Err(berr(
                target,
                "the target data directory is not empty; restore only into a new or empty folder (a live data directory is never overwritten)",
            ));
        }
    }
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| berr(parent, e.to_string()))?;
    let staging = tempfile::Builder::new()
        .prefix(".noa-restore-")
        .tempdir_in(parent)
        .map_err(|e| berr(parent, e.to_string()))?;
    let m = read_archive(archive, Some(staging.path()), progress)?;
    check_snapshot(archive, staging.path(), &m)?;
    let key_dest = staging.path().join("store.key");
    if m.key_kind == "file" && !key_dest.exists() {
        let src = key_file.ok_or_else(|| {
            berr(
                archive,
                format!(
                    "the archive holds no key; pass --key-file with the store key {} (the store.key of the data directory it came from, or store.key.{} if that store was rekeyed since)",
                    m.key_id, m.key_id
                ),
            )
        })?;
        let key = crate::crypto::read_key_file(src)?.ok_or_else(|| Error::Key {
            path: src.to_owned(),
            message: "it does not exist".into(),
        })?;
        if crate::crypto::kek_id(&key) != m.key_id {
            return Err(Error::WrongKey {
                source_desc: format!("key file {}", src.display()),
                needed: m.key_id.clone(),
                hint: format!(
                    "pass the key file of the data directory the backup was taken from (after a rekey it is kept as store.key.{})",
                    m.key_id
                ),
            });
        }
        crate::crypto::write_key_file(&key_dest, &key)?;
    }
    // The restored node signs with a new key unless the archive brought the old one; the old public key
    // stays trusted so the audit checkpoints it signed still verify.
    if !staging.path().join("node.key").exists() {
        std::fs::write(
            staging.path().join(crate::audit::TRUSTED_KEYS),
            format!("{}\n", m.node_key),
        )
        .map_err(|e| berr(target, e.to_string()))?;
    }
    std::fs::create_dir_all(staging.path().join("blobs"))
        .map_err(|e| berr(target, e.to_string()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o700));
    crate::crypto::sync_dir(staging.path());
    if target.exists() {
        std::fs::remove_dir(target).map_err(|e| berr(target, e.to_string()))?;
    }
    let staged: PathBuf = staging.keep();
    std::fs::rename(&staged, target).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        berr(target, e.to_string())
    })?;
    crate::crypto::sync_dir(parent);
    Ok(m)
}

/// Short description of a manifest for people.
pub fn describe(m: &Manifest) -> String {
    format!(
        "{} entries, {} bytes, schema v{}, key {} ({}), node {}{}",
        m.entries.len(),
        m.total_bytes(),
        m.schema_version,
        m.key_id,
        m.key_kind,
        m.node_key.get(..16).unwrap_or(&m.node_key),
        if m.includes_keys {
            ", keys included"
        } else {
            ""
        }
    )
}
