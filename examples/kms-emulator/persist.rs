//! The state directory: the whole store as one JSON file, replaced atomically (write a
//! temporary file, fsync it, rename it over the old one, fsync the directory) so a crash or
//! SIGKILL leaves either the old or the new state, never a torn one.
//!
//! The emulator plays KMS, so this file holds secret values in clear: the directory is
//! created 0700 and the file 0600, and it belongs in a test or lab directory only.
#![forbid(unsafe_code)]

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::state::Store;

const STATE_FILE: &str = "secrets.json";
const FORMAT: u32 = 1;

#[derive(Deserialize)]
struct OnDisk {
    format: u32,
    store: Store,
}

#[derive(Serialize)]
struct OnDiskRef<'a> {
    format: u32,
    store: &'a Store,
}

/// The `--state DIR` directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed, mode 0700) the state directory.
    pub fn open(dir: &Path) -> io::Result<StateDir> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Loads the saved store, or an empty one when the directory is new.
    pub fn load(&self) -> io::Result<Store> {
        let path = self.file();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Store::default()),
            Err(e) => return Err(e),
        };
        let disk: OnDisk = serde_json::from_slice(&text).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a kms-emulator state file: {e}", path.display()),
            )
        })?;
        if disk.format != FORMAT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} has state format {}, this emulator reads {FORMAT}",
                    path.display(),
                    disk.format
                ),
            ));
        }
        Ok(disk.store)
    }

    /// Replaces the saved store atomically.
    pub fn save(&self, store: &Store) -> io::Result<()> {
        let json = serde_json::to_vec(&OnDiskRef {
            format: FORMAT,
            store,
        })
        .map_err(io::Error::other)?;
        let tmp = self
            .dir
            .join(format!(".{STATE_FILE}.tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            fs::rename(&tmp, self.file())?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NewSecret;

    #[test]
    fn save_then_load_round_trips_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(&dir.path().join("state")).unwrap();
        assert_eq!(sd.load().unwrap(), Store::default());
        let mut st = Store::default();
        st.create(
            NewSecret {
                name: "a".into(),
                version_id: "v1".into(),
                data: "one".into(),
                ..NewSecret::default()
            },
            1,
            "r",
        )
        .unwrap();
        sd.save(&st).unwrap();
        sd.save(&st).unwrap();
        assert_eq!(sd.load().unwrap(), st);
        let names: Vec<_> = fs::read_dir(dir.path().join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(STATE_FILE)]);
    }

    #[test]
    fn garbage_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), "nope").unwrap();
        let err = StateDir::open(dir.path()).unwrap().load().unwrap_err();
        assert!(err.to_string().contains(STATE_FILE));
    }
}
