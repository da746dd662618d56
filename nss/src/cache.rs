//! The parsed configuration, cached by the identity of the files it depends on
//! (device, inode, size, mtime of the configuration, `/etc/passwd` and `/etc/group`), so a
//! lookup costs three `stat`s unless something changed. Errors are cached the same way: a
//! broken file is not re-parsed on every lookup.
#![forbid(unsafe_code)]

use kmsbastion::config::{Config, ConfigErrorKind, LOCAL_GROUP_PATH, LOCAL_PASSWD_PATH};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, TryLockError};

/// Why the configuration is unavailable, as the errno reported with `NSS_STATUS_UNAVAIL`.
pub type Errno = libc::c_int;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn file_id(path: &Path) -> std::io::Result<FileId> {
    let m = std::fs::metadata(path)?;
    Ok(FileId {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    path: PathBuf,
    config: FileId,
    passwd: Option<FileId>,
    group: Option<FileId>,
}

struct Cached {
    key: Key,
    result: Result<Arc<Config>, Errno>,
}

static CACHE: Mutex<Option<Cached>> = Mutex::new(None);

fn errno_for(kind: ConfigErrorKind) -> Errno {
    match kind {
        ConfigErrorKind::Missing => libc::ENOENT,
        ConfigErrorKind::Unreadable | ConfigErrorKind::Syntax | ConfigErrorKind::Invalid => {
            libc::EIO
        }
    }
}

/// The configuration at `path`, parsed at most once per file identity.
pub fn config_at(path: &Path) -> Result<Arc<Config>, Errno> {
    let config = match file_id(path) {
        Ok(id) => id,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(libc::ENOENT),
        Err(_) => return Err(libc::EIO),
    };
    let key = Key {
        path: path.to_owned(),
        config,
        passwd: file_id(Path::new(LOCAL_PASSWD_PATH)).ok(),
        group: file_id(Path::new(LOCAL_GROUP_PATH)).ok(),
    };
    let load = || {
        Config::load(path)
            .map(Arc::new)
            .map_err(|e| errno_for(e.kind))
    };
    // try_lock, never lock: a lookup must not wait, and a child forked while another thread
    // held the lock would otherwise deadlock on its first lookup. When the cache is busy the
    // configuration is parsed without it (a fraction of a millisecond). A panic while the lock
    // was held cannot leave the cache half-written (it is replaced whole), so a poisoned lock
    // is still usable.
    let mut guard = match CACHE.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return load(),
    };
    if let Some(c) = guard.as_ref().filter(|c| c.key == key) {
        return c.result.clone();
    }
    let result = load();
    *guard = Some(Cached {
        key,
        result: result.clone(),
    });
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn caches_by_identity_and_sees_changes() {
        let dir = tempfile_dir();
        let p = dir.join("k.toml");
        assert_eq!(config_at(&p).err(), Some(libc::ENOENT));
        std::fs::write(
            &p,
            "[kms]\nregion = \"cn-hangzhou\"\n[bastion]\ngid = 64000\n",
        )
        .unwrap();
        let a = config_at(&p).unwrap();
        let b = config_at(&p).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "second lookup must come from the cache"
        );
        std::fs::write(
            &p,
            "[kms]\nregion = \"cn-hangzhou\"\n[bastion]\ngid = 64000\nbogus = 1\n",
        )
        .unwrap();
        assert_eq!(config_at(&p).err(), Some(libc::EIO));
        std::fs::write(
            &p,
            "[kms]\nregion = \"cn-hangzhou\"\n[bastion]\ngid = 64010\n",
        )
        .unwrap();
        assert_eq!(config_at(&p).unwrap().bastion.gid, 64010);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("nss-kmsbastion-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
