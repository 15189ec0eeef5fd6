//! The keyring row: the data key wrapped by the key-encryption key, created on first open.
//!
//! Rotating a key file is crash-safe: the new key goes to `<key>.new` (fsynced) before the database row
//! changes, and is renamed over the old key only after the row committed. Whichever of the two files
//! matches the row's key id unlocks the store, so a crash at any step leaves a store that opens.

use crate::crypto::{self, DataKey, KeySource};
use crate::{Error, Result};
use rusqlite::{Connection, OptionalExtension, params};
use std::path::{Path, PathBuf};

const WRAP_AAD: &[u8] = b"noa data key v1";

pub(crate) struct Row {
    pub kek_id: String,
    pub kind: String,
    pub salt: Option<Vec<u8>>,
    pub wrapped: Vec<u8>,
}

pub(crate) fn read_row(conn: &Connection) -> Result<Option<Row>> {
    Ok(conn
        .query_row(
            "SELECT kek_id, kek_kind, salt, wrapped FROM keyring WHERE id = 1",
            [],
            |r| {
                Ok(Row {
                    kek_id: r.get(0)?,
                    kind: r.get(1)?,
                    salt: r.get(2)?,
                    wrapped: r.get(3)?,
                })
            },
        )
        .optional()?)
}

pub(crate) fn pending_path(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// A new key-encryption key for `source`: the key, its id, and the salt to store (passphrases only).
/// For a key file, the key is written to `<file>.new`; [`commit_key_file`] moves it into place.
pub(crate) fn new_kek(source: &KeySource) -> Result<([u8; 32], Option<Vec<u8>>)> {
    match source {
        KeySource::File(path) => {
            let kek = crypto::random32()?;
            crypto::write_key_file(&pending_path(path), &kek)?;
            Ok((kek, None))
        }
        KeySource::Passphrase(p) => {
            if p.is_empty() {
                return Err(Error::Crypto("the passphrase is empty".into()));
            }
            let salt = crypto::random32()?[..16].to_vec();
            Ok((crypto::kek_from_passphrase(p, &salt)?, Some(salt)))
        }
    }
}

pub(crate) fn commit_key_file(source: &KeySource) -> Result<()> {
    if let KeySource::File(path) = source {
        std::fs::rename(pending_path(path), path).map_err(|e| Error::Key {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if let Some(dir) = path.parent() {
            crypto::sync_dir(dir);
        }
    }
    Ok(())
}

pub(crate) fn wrap(kek: &[u8; 32], dek: &DataKey) -> Result<Vec<u8>> {
    crypto::seal(kek, dek.raw(), WRAP_AAD)
}

/// Unlocks the store's data key, creating the keyring (and key file) on first open.
pub(crate) fn unlock(conn: &Connection, source: &KeySource) -> Result<(DataKey, String)> {
    let Some(row) = read_row(conn)? else {
        // First open: a fresh data key, wrapped by an existing key file or a new one.
        let (kek, salt) = match source {
            KeySource::File(path) => match crypto::read_key_file(path)? {
                Some(k) => (k, None),
                None => {
                    let r = new_kek(source)?;
                    commit_key_file(source)?;
                    r
                }
            },
            KeySource::Passphrase(_) => new_kek(source)?,
        };
        let dek = DataKey::new(crypto::random32()?);
        let id = crypto::kek_id(&kek);
        conn.execute(
            "INSERT INTO keyring (id, kek_id, kek_kind, salt, wrapped, created_ms) VALUES (1, ?1, ?2, ?3, ?4, ?5)",
            params![id, source.kind(), salt, wrap(&kek, &dek)?, noa_types::now_ms() as i64],
        )?;
        return Ok((dek, id));
    };
    let kek = match (source, row.kind.as_str()) {
        (KeySource::File(path), "file") => {
            let mut found = None;
            for candidate in [path.clone(), pending_path(path)] {
                if let Some(k) = crypto::read_key_file(&candidate)?
                    && crypto::kek_id(&k) == row.kek_id
                {
                    found = Some((k, candidate));
                    break;
                }
            }
            match found {
                Some((k, at)) => {
                    if at != *path {
                        // A rotation committed in the database but crashed before the rename: finish it.
                        commit_key_file(source)?;
                    }
                    k
                }
                None => {
                    return Err(Error::WrongKey {
                        source_desc: format!("key file {}", path.display()),
                        needed: row.kek_id,
                        hint: if path.exists() {
                            "use the key file this store was created or rekeyed with".into()
                        } else {
                            "the key file is missing; restore it from where you keep it".into()
                        },
                    });
                }
            }
        }
        (KeySource::Passphrase(p), "passphrase") => {
            crypto::kek_from_passphrase(p, row.salt.as_deref().unwrap_or_default())?
        }
        (KeySource::File(path), _) => {
            return Err(Error::WrongKey {
                source_desc: format!("key file {}", path.display()),
                needed: row.kek_id,
                hint: "this store is protected by a passphrase: `noa config set store.key passphrase`, then give it in NOA_PASSPHRASE or --passphrase-file".into(),
            });
        }
        (KeySource::Passphrase(_), _) => {
            return Err(Error::WrongKey {
                source_desc: "a passphrase".into(),
                needed: row.kek_id,
                hint: "this store is protected by a key file (store.key); unset NOA_PASSPHRASE"
                    .into(),
            });
        }
    };
    if crypto::kek_id(&kek) != row.kek_id {
        return Err(Error::WrongKey {
            source_desc: source_desc(source),
            needed: row.kek_id,
            hint: "the passphrase is wrong".into(),
        });
    }
    let raw = crypto::open(&kek, &row.wrapped, WRAP_AAD).ok_or_else(|| Error::Corrupt {
        what: "keyring".into(),
        message: "the wrapped data key fails authentication".into(),
    })?;
    let raw: [u8; 32] = raw.try_into().map_err(|_| Error::Corrupt {
        what: "keyring".into(),
        message: "the data key is not 32 bytes".into(),
    })?;
    Ok((DataKey::new(raw), row.kek_id))
}

pub(crate) fn source_desc(source: &KeySource) -> String {
    match source {
        KeySource::File(p) => format!("key file {}", p.display()),
        KeySource::Passphrase(_) => "the passphrase".into(),
    }
}
