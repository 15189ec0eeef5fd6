//! Host folders mounted at `/host/<name>`: every file operation goes through folder descriptors, one path
//! component at a time, so nothing can lead it out of the mount.
//!
//! Checking a path and then opening it by name leaves a gap: between the two, a folder on the way can be
//! swapped for a symbolic link to `/`. Here the mount's folder is opened once, each component below it is
//! opened relative to the folder before it with `O_NOFOLLOW`, and the last one is read, created, renamed into
//! place or removed relative to its folder's descriptor (`openat`, `renameat`, `unlinkat`). A link anywhere
//! below the mount is refused by the kernel at the moment of use, not by an earlier look.

use crate::vfs::{DirEntry, Mount};
use crate::{Error, Result};
use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// An entry inside a mount: the folder that holds it, opened without following a link at any step, and its
/// name there (none for the mount's own folder).
#[derive(Debug)]
pub struct HostEntry {
    dir: OwnedFd,
    name: Option<String>,
    shown: String,
}

impl HostEntry {
    /// Opens the folder that holds `rest` below `mount`. With `create_parents`, missing folders on the way
    /// are made (inside the mount).
    pub fn resolve(mount: &Mount, rest: &[String], create_parents: bool) -> Result<HostEntry> {
        let shown = if rest.is_empty() {
            format!("/host/{}", mount.name)
        } else {
            format!("/host/{}/{}", mount.name, rest.join("/"))
        };
        let mut dir = rustix::fs::openat(
            CWD,
            mount.host_path.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::Host {
            path: shown.clone(),
            message: format!("the mount's folder {}: {}", mount.host_path, io(e)),
        })?;
        for part in rest {
            // VPath already rejected `.`, `..`, `/` and NUL; check once more that each part is one plain name.
            let mut comps = Path::new(part).components();
            if !matches!(
                (comps.next(), comps.next()),
                (Some(Component::Normal(_)), None)
            ) {
                return Err(Error::Path {
                    path: shown,
                    message: format!("component {part:?} is not a plain name"),
                });
            }
        }
        let Some((last, folders)) = rest.split_last() else {
            return Ok(HostEntry {
                dir,
                name: None,
                shown,
            });
        };
        for part in folders {
            dir = open_folder(&dir, part, create_parents, &shown)?;
        }
        Ok(HostEntry {
            dir,
            name: Some(last.clone()),
            shown,
        })
    }

    /// The entry's path as the VFS shows it.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn host_err(&self, e: impl std::fmt::Display) -> Error {
        Error::Host {
            path: self.shown.clone(),
            message: e.to_string(),
        }
    }

    fn name(&self) -> Result<&str> {
        self.name.as_deref().ok_or_else(|| Error::Path {
            path: self.shown.clone(),
            message: "is the mount itself, not a file".into(),
        })
    }

    /// What is at the entry, without following a link; `None` when nothing is.
    fn file_type(&self) -> Result<Option<FileType>> {
        let Some(name) = &self.name else {
            return Ok(Some(FileType::Directory));
        };
        match rustix::fs::statat(&self.dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(self.host_err(io(e))),
        }
    }

    /// Whether the entry is a folder (a link to one is not).
    pub fn is_dir(&self) -> bool {
        matches!(self.file_type(), Ok(Some(FileType::Directory)))
    }

    fn link_refused(&self) -> Error {
        self.host_err("is a symbolic link; links are not followed out of a mount")
    }

    /// Opens the entry for reading: never through a link (`O_NOFOLLOW`), never blocking on a FIFO
    /// (`O_NONBLOCK`), and only if it is a regular file. Returns the file and its size.
    pub fn open_read(&self) -> Result<(std::fs::File, u64)> {
        let name = self.name()?;
        let fd = rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOENT => Error::NotFound {
                path: self.shown.clone(),
            },
            Errno::LOOP => self.link_refused(),
            e => self.host_err(io(e)),
        })?;
        let file = std::fs::File::from(fd);
        let meta = file.metadata().map_err(|e| self.host_err(e))?;
        if !meta.is_file() {
            return Err(self.host_err("not a regular file"));
        }
        Ok((file, meta.len()))
    }

    /// Lists the folder the entry names; links are left out.
    pub fn list(&self) -> Result<Vec<DirEntry>> {
        let dir = match &self.name {
            None => rustix::fs::openat(&self.dir, ".", DIR_FLAGS, Mode::empty())
                .map_err(|e| self.host_err(io(e)))?,
            Some(name) => open_folder(&self.dir, name, false, &self.shown)?,
        };
        let entries = rustix::fs::Dir::read_from(&dir).map_err(|e| self.host_err(io(e)))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.host_err(io(e)))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let Ok(st) = rustix::fs::statat(&dir, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let kind = FileType::from_raw_mode(st.st_mode);
            if kind == FileType::Symlink {
                continue;
            }
            let is_dir = kind == FileType::Directory;
            // The field types differ across targets (`c_long`, `i64`, `u32`, `c_ulong`).
            #[allow(clippy::useless_conversion)]
            let (secs, nanos) = (i64::from(st.st_mtime), u64::from(st.st_mtime_nsec));
            let mtime_ms = u64::try_from(secs)
                .ok()
                .and_then(|s| s.checked_mul(1000)?.checked_add(nanos / 1_000_000));
            out.push(DirEntry {
                name,
                dir: is_dir,
                size: if is_dir {
                    0
                } else {
                    u64::try_from(st.st_size).unwrap_or(0)
                },
                version: None,
                mtime_ms,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Starts writing the entry: a new temporary file (random name, created exclusively) in its folder.
    /// Write to [`HostWrite::file`], then [`HostWrite::commit`] it; dropped uncommitted, it is removed.
    pub fn create(self) -> Result<HostWrite> {
        let name = self.name()?.to_owned();
        if self.file_type()? == Some(FileType::Directory) {
            return Err(self.host_err("is a folder"));
        }
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| Error::Crypto(e.to_string()))?;
        let tmp = format!(
            ".noa-{}",
            random
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        // A new file gets the usual mode (0644 less the umask); a replaced one keeps its own.
        let mode = rustix::fs::statat(&self.dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .filter(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
            .map(|st| Mode::from_raw_mode(st.st_mode & 0o7777));
        let fd = rustix::fs::openat(
            &self.dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| self.host_err(io(e)))?;
        if let Some(mode) = mode {
            rustix::fs::fchmod(&fd, mode).map_err(|e| self.host_err(io(e)))?;
        }
        Ok(HostWrite {
            file: std::fs::File::from(fd),
            tmp: Some(tmp),
            name,
            entry: self,
        })
    }

    /// Removes the file the entry names (not a folder, not a link).
    pub fn remove(&self) -> Result<()> {
        let name = self.name()?;
        match self.file_type()? {
            None => {
                return Err(Error::NotFound {
                    path: self.shown.clone(),
                });
            }
            Some(FileType::Symlink) => return Err(self.link_refused()),
            Some(FileType::Directory) => return Err(self.host_err("is a folder")),
            Some(_) => {}
        }
        rustix::fs::unlinkat(&self.dir, name, AtFlags::empty()).map_err(|e| match e {
            Errno::NOENT => Error::NotFound {
                path: self.shown.clone(),
            },
            e => self.host_err(io(e)),
        })?;
        let _ = rustix::fs::fsync(&self.dir);
        Ok(())
    }
}

/// A host file being written: a temporary file beside its destination, in the same folder descriptor.
#[derive(Debug)]
pub struct HostWrite {
    entry: HostEntry,
    file: std::fs::File,
    /// The temporary file's name; `None` once it has been renamed into place.
    tmp: Option<String>,
    name: String,
}

impl HostWrite {
    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file
    }

    /// The destination's path as the VFS shows it.
    pub fn shown(&self) -> &str {
        &self.entry.shown
    }

    /// Makes the written file durable and renames it over the destination (replacing a file, or a link at
    /// that name, never writing through one), then makes the rename durable. Returns the size.
    pub fn commit(mut self) -> Result<u64> {
        let err = |e: std::io::Error| Error::Host {
            path: self.entry.shown.clone(),
            message: e.to_string(),
        };
        self.file.sync_all().map_err(err)?;
        let size = self.file.metadata().map_err(err)?.len();
        let tmp = self.tmp.as_deref().unwrap_or_default();
        rustix::fs::renameat(&self.entry.dir, tmp, &self.entry.dir, self.name.as_str())
            .map_err(|e| err(io(e)))?;
        self.tmp = None;
        rustix::fs::fsync(&self.entry.dir).map_err(|e| err(io(e)))?;
        Ok(size)
    }
}

impl Drop for HostWrite {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = rustix::fs::unlinkat(&self.entry.dir, tmp.as_str(), AtFlags::empty());
        }
    }
}

/// Opens the folder `part` inside `dir` without following a link; with `create`, makes it first if missing.
fn open_folder(dir: &OwnedFd, part: &str, create: bool, shown: &str) -> Result<OwnedFd> {
    let host_err = |message: String| Error::Host {
        path: shown.to_owned(),
        message,
    };
    // A link or a file where a folder should be; any other error (permissions, descriptors) as it is.
    let refused = |dir: &OwnedFd, e: Errno| {
        if !matches!(e, Errno::LOOP | Errno::NOTDIR) {
            return host_err(format!("{part}: {}", io(e)));
        }
        match rustix::fs::statat(dir, part, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => host_err(
                format!("{part} is a symbolic link; links are not followed out of a mount"),
            ),
            Ok(_) => host_err(format!("{part} is not a folder")),
            Err(_) => host_err(format!("{part}: {}", io(e))),
        }
    };
    match rustix::fs::openat(dir, part, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => Ok(fd),
        Err(Errno::NOENT) if create => {
            match rustix::fs::mkdirat(dir, part, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(host_err(format!("{part}: {}", io(e)))),
            }
            rustix::fs::openat(dir, part, DIR_FLAGS, Mode::empty()).map_err(|e| refused(dir, e))
        }
        Err(Errno::NOENT) => Err(Error::NotFound {
            path: shown.to_owned(),
        }),
        Err(e) => Err(refused(dir, e)),
    }
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(root: &Path) -> Mount {
        Mount {
            name: "m".into(),
            host_path: root.display().to_string(),
            read_only: false,
        }
    }

    fn parts(p: &str) -> Vec<String> {
        p.split('/').map(str::to_owned).collect()
    }

    /// Writes `bytes` to `path` below the mount as the store does: resolve (making folders), create, commit.
    fn write(m: &Mount, path: &str, bytes: &[u8]) -> u64 {
        let mut w = HostEntry::resolve(m, &parts(path), true)
            .unwrap()
            .create()
            .unwrap();
        std::io::Write::write_all(w.file(), bytes).unwrap();
        w.commit().unwrap()
    }

    #[test]
    fn host_paths_never_escape_the_mount() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("m");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        let m = mount(&root);
        let e = HostEntry::resolve(&m, &parts("link"), false)
            .unwrap()
            .open_read()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "NOA-E0313 host file error at /host/m/link: is a symbolic link; links are not followed out of a mount"
        );
        let e = HostEntry::resolve(&m, &parts("up/secret"), false).unwrap_err();
        assert!(e.to_string().contains("up is a symbolic link"), "{e}");
        let e = HostEntry::resolve(&m, &["a/../../x".into()], false).unwrap_err();
        assert!(e.to_string().contains("plain name"), "{e}");
        // Writing through a link replaces the link; the file it pointed at is untouched.
        assert_eq!(write(&m, "link", b"new"), 3);
        assert_eq!(std::fs::read(dir.path().join("secret")).unwrap(), b"s");
        assert_eq!(std::fs::read(root.join("link")).unwrap(), b"new");
        // Missing parents are made inside the mount.
        write(&m, "new/deep/f", b"x");
        assert_eq!(std::fs::read(root.join("new/deep/f")).unwrap(), b"x");
        let e = HostEntry::resolve(&m, &parts("nope/f"), false).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        assert!(
            !root.join("nope").exists(),
            "resolving without create makes no folder"
        );
        // A replaced file keeps its mode.
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(root.join("private"), "old").unwrap();
        std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        write(&m, "private", b"new");
        let meta = std::fs::metadata(root.join("private")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // A listing leaves links out.
        let names: Vec<_> = HostEntry::resolve(&m, &[], false)
            .unwrap()
            .list()
            .unwrap()
            .into_iter()
            .map(|e| (e.name, e.dir))
            .collect();
        assert_eq!(
            names,
            vec![
                ("link".to_owned(), false),
                ("new".to_owned(), true),
                ("private".to_owned(), false)
            ]
        );
    }

    #[test]
    fn a_folder_swapped_for_a_link_after_resolving_is_not_followed() {
        // The race that a check-then-open design loses: resolve `a/f`, then replace `a` with a link to a
        // folder outside the mount before the file is opened or written. The folder descriptor still
        // names the original `a`, so the outside file is neither read nor written.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("m");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(root.join("a/f"), "inside").unwrap();
        std::fs::write(outside.join("f"), "outside").unwrap();
        let m = mount(&root);
        let read = HostEntry::resolve(&m, &parts("a/f"), false).unwrap();
        let write = HostEntry::resolve(&m, &parts("a/f"), true).unwrap();
        std::fs::rename(root.join("a"), dir.path().join("a-moved")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a")).unwrap();
        let (mut file, _) = read.open_read().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut file, &mut text).unwrap();
        assert_eq!(text, "inside");
        let mut w = write.create().unwrap();
        std::io::Write::write_all(w.file(), b"written").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::read(outside.join("f")).unwrap(), b"outside");
        assert_eq!(
            std::fs::read(dir.path().join("a-moved/f")).unwrap(),
            b"written"
        );
        // Resolved afresh, the link is refused.
        let e = HostEntry::resolve(&m, &parts("a/f"), false).unwrap_err();
        assert!(e.to_string().contains("a is a symbolic link"), "{e}");
    }

    #[test]
    fn an_abandoned_write_leaves_nothing_and_remove_refuses_folders_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("f"), "1").unwrap();
        std::os::unix::fs::symlink(root.join("f"), root.join("l")).unwrap();
        let m = mount(&root);
        let mut w = HostEntry::resolve(&m, &parts("g"), true)
            .unwrap()
            .create()
            .unwrap();
        std::io::Write::write_all(w.file(), b"half").unwrap();
        drop(w);
        let mut left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["d", "f", "l"]);
        let e = HostEntry::resolve(&m, &parts("d"), true)
            .unwrap()
            .remove()
            .unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
        let e = HostEntry::resolve(&m, &parts("l"), true)
            .unwrap()
            .remove()
            .unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let e = HostEntry::resolve(&m, &parts("d"), true)
            .unwrap()
            .create()
            .unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
        HostEntry::resolve(&m, &parts("f"), true)
            .unwrap()
            .remove()
            .unwrap();
        assert!(!root.join("f").exists());
        let e = HostEntry::resolve(&m, &parts("f"), true)
            .unwrap()
            .remove()
            .unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
    }
}
