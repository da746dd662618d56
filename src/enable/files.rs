//! Files under the target root: exact snapshots (bytes, mode, owner) and atomic writes.
#![forbid(unsafe_code)]

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// A regular file exactly as it was: contents, permission bits and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileImage {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

impl FileImage {
    /// Hex SHA-256 of the contents.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.bytes)
    }
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `path` (absolute, as seen on the target system) resolved under `root`.
pub fn under_root(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for part in path.components() {
        if let Component::Normal(p) = part {
            out.push(p);
        }
    }
    out
}

/// Reads a file exactly, or `None` when it does not exist. Symlinks are refused: writing
/// through them atomically would replace the link with a file, which is not "exactly as
/// it was".
pub fn read_image(path: &Path) -> io::Result<Option<FileImage>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if meta.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is a symbolic link; kmsbastion edits only regular files",
                path.display()
            ),
        ));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let bytes = fs::read(path)?;
    Ok(Some(FileImage {
        bytes,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

/// Writes `image` to `path` atomically (a temporary file in the same directory, fsync,
/// rename), with its mode and owner.
pub fn write_image(path: &Path, image: &FileImage) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent", path.display()),
        )
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.kmsbastion-tmp"));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(&image.bytes)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(image.mode))?;
        chown_if_needed(&tmp, image.uid, image.gid)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Sets the owner unless it already matches (so unprivileged unit tests work).
fn chown_if_needed(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let meta = fs::metadata(path)?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// Puts a file back exactly as `image` says, or removes it when it did not exist.
pub fn restore(path: &Path, image: Option<&FileImage>) -> io::Result<()> {
    match image {
        Some(image) => write_image(path, image),
        None => match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// The regular files directly inside `dir` (not recursive), sorted; empty when `dir`
/// does not exist.
pub fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn under_root_strips_the_leading_slash_and_dots() {
        assert_eq!(
            under_root(Path::new("/r"), Path::new("/etc/x")),
            PathBuf::from("/r/etc/x")
        );
        assert_eq!(
            under_root(Path::new("/"), Path::new("/etc/x")),
            PathBuf::from("/etc/x")
        );
        assert_eq!(
            under_root(Path::new("/r"), Path::new("/../etc")),
            PathBuf::from("/r/etc")
        );
    }

    #[test]
    fn write_then_read_round_trips_bytes_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let meta = fs::metadata(dir.path()).unwrap();
        let image = FileImage {
            bytes: b"a\x00b\n".to_vec(),
            mode: 0o640,
            uid: meta.uid(),
            gid: meta.gid(),
        };
        write_image(&path, &image).unwrap();
        assert_eq!(read_image(&path).unwrap(), Some(image.clone()));
        restore(&path, None).unwrap();
        assert_eq!(read_image(&path).unwrap(), None);
        assert_eq!(list_files(dir.path()).unwrap(), Vec::<PathBuf>::new());
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("t"), "x").unwrap();
        std::os::unix::fs::symlink("t", dir.path().join("l")).unwrap();
        assert!(read_image(&dir.path().join("l")).is_err());
    }
}
