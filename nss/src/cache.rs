//! The configuration, cached by the identity of the files it depends on (device, inode, size,
//! mtime and ctime of the configuration, `/etc/passwd` and `/etc/group`), so a warm lookup
//! costs three `stat`s unless something changed.
//!
//! What is cached per identity is the configuration's source: its verified lookup index
//! (`kmsbastion::config::index`), from which each lookup decodes just the records it needs
//! (the last few decoded answers are kept), or, when there is no fresh index, the whole
//! parsed file. Errors are cached the same way: a broken file is not re-parsed on every
//! lookup.
#![forbid(unsafe_code)]

use kmsbastion::config::index::{Index, Inputs};
use kmsbastion::config::{Config, ConfigErrorKind, Scope};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, TryLockError};

/// Why the configuration is unavailable, as the errno reported with `NSS_STATUS_UNAVAIL`.
pub type Errno = libc::c_int;

/// Decoded answers kept per index (one process resolves few distinct names).
const MEMO_ENTRIES: usize = 16;

/// The NSS lookups, as cache keys.
#[derive(Debug, Clone, PartialEq, Eq)]
enum MemoKey {
    Name(String),
    Uid(u32),
    Engineers,
}

impl MemoKey {
    fn of(scope: Scope<'_>) -> Option<MemoKey> {
        match scope {
            Scope::Name(n) => Some(MemoKey::Name(n.to_owned())),
            Scope::Uid(u) => Some(MemoKey::Uid(u)),
            Scope::Engineers => Some(MemoKey::Engineers),
            Scope::Full | Scope::Login(_) | Scope::Engineer(_) => None,
        }
    }
}

enum Source {
    Index {
        index: Box<Index>,
        memo: Vec<(MemoKey, Arc<Config>)>,
    },
    Full(Arc<Config>),
}

struct Cached {
    path: PathBuf,
    inputs: Inputs,
    source: Result<Source, Errno>,
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

fn full_load(path: &Path) -> Result<Arc<Config>, Errno> {
    Config::load(path)
        .map(Arc::new)
        .map_err(|e| errno_for(e.kind))
}

/// The source for the files as they are now: the index if it is fresh, else the whole file.
fn open(path: &Path, inputs: Inputs) -> (Inputs, Result<Source, Errno>) {
    match Index::open(path) {
        Ok(mut index) => {
            // No descriptor stays open in the program we are loaded into: records are read
            // by reopening the (verified) file.
            index.close_file();
            (
                *index.inputs(),
                Ok(Source::Index {
                    index: Box::new(index),
                    memo: Vec::new(),
                }),
            )
        }
        Err(_) => (inputs, full_load(path).map(Source::Full)),
    }
}

impl Source {
    fn answer(&mut self, path: &Path, scope: Scope<'_>) -> Result<Arc<Config>, Errno> {
        match self {
            Source::Full(cfg) => Ok(Arc::clone(cfg)),
            Source::Index { index, memo } => {
                let key = MemoKey::of(scope);
                if let Some((_, cfg)) = memo.iter().find(|(k, _)| Some(k) == key.as_ref()) {
                    return Ok(Arc::clone(cfg));
                }
                match index.scoped(path, scope) {
                    Ok(cfg) => {
                        let cfg = Arc::new(cfg);
                        if let Some(k) = key {
                            if memo.len() >= MEMO_ENTRIES {
                                memo.remove(0);
                            }
                            memo.push((k, Arc::clone(&cfg)));
                        }
                        Ok(cfg)
                    }
                    // Replaced since (a rebuild) or damaged: the whole file, for these inputs.
                    Err(_) => {
                        let full = full_load(path)?;
                        *self = Source::Full(Arc::clone(&full));
                        Ok(full)
                    }
                }
            }
        }
    }
}

/// The configuration at `path` as far as `scope` needs it, parsed at most once per file
/// identity.
pub fn config_for(path: &Path, scope: Scope<'_>) -> Result<Arc<Config>, Errno> {
    let inputs = match Inputs::current(path) {
        Ok(i) => i,
        Err(_) if !path.exists() => return Err(libc::ENOENT),
        // /etc/passwd or /etc/group unreadable: the loader says so (EIO).
        Err(_) => return full_load(path),
    };
    // try_lock, never lock: a lookup must not wait, and a child forked while another thread
    // held the lock would otherwise deadlock on its first lookup. When the cache is busy the
    // lookup goes without it. A panic while the lock was held cannot leave the cache
    // half-written (entries are replaced whole), so a poisoned lock is still usable.
    let mut guard = match CACHE.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return Config::load_scoped(path, scope)
                .map(Arc::new)
                .map_err(|e| errno_for(e.kind))
        }
    };
    let fresh = guard
        .as_ref()
        .is_some_and(|c| c.inputs == inputs && c.path == path);
    if !fresh {
        let (inputs, source) = open(path, inputs);
        *guard = Some(Cached {
            path: path.to_owned(),
            inputs,
            source,
        });
    }
    match guard.as_mut().map(|c| &mut c.source) {
        Some(Ok(source)) => source.answer(path, scope),
        Some(Err(errno)) => Err(*errno),
        None => full_load(path),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn caches_by_identity_and_sees_changes() {
        let dir = tempfile_dir();
        let p = dir.join("k.toml");
        assert_eq!(config_for(&p, Scope::Engineers).err(), Some(libc::ENOENT));
        std::fs::write(
            &p,
            "[kms]\nregion = \"cn-hangzhou\"\n[bastion]\ngid = 64000\n",
        )
        .unwrap();
        let a = config_for(&p, Scope::Engineers).unwrap();
        let b = config_for(&p, Scope::Uid(1)).unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "without an index, the parsed file is cached whole"
        );
        std::fs::write(
            &p,
            "[kms]\nregion = \"cn-hangzhou\"\n[bastion]\ngid = 64000\nbogus = 1\n",
        )
        .unwrap();
        assert_eq!(config_for(&p, Scope::Engineers).err(), Some(libc::EIO));
        std::fs::write(
            &p,
            "[kms]\nregion = \"cn-hangzhou\"\n[bastion]\ngid = 64010\n",
        )
        .unwrap();
        assert_eq!(config_for(&p, Scope::Engineers).unwrap().bastion.gid, 64010);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memo_keys_cover_the_nss_lookups_only() {
        assert_eq!(
            MemoKey::of(Scope::Name("alice")),
            Some(MemoKey::Name("alice".into()))
        );
        assert_eq!(MemoKey::of(Scope::Uid(7)), Some(MemoKey::Uid(7)));
        assert_eq!(MemoKey::of(Scope::Full), None);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("nss-kmsbastion-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
