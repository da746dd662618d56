//! The record of what `enable` changed, so that `disable` can put back every byte.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::files::{self, FileImage};

/// Where the record lives on the target system (0600, root only: it holds copies of
/// PAM and sshd configuration, which are not secret but are nobody else's business).
pub const STATE_PATH: &str = "/var/lib/kmsbastion/enable-state.json";

/// Format version of the state file.
const VERSION: u32 = 1;

/// Everything `enable` changed on one system.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Files changed or created, with their original image.
    pub files: Vec<TouchedFile>,
    /// Directories `enable` created (removed by `disable` when empty), deepest last.
    pub created_dirs: Vec<String>,
}

/// One file `enable` changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TouchedFile {
    /// Absolute path on the target system.
    pub path: String,
    /// The file before the first `enable`; `None` when `enable` created it.
    pub original: Option<StoredImage>,
    /// SHA-256 of the file as `enable` left it (`None`: absent), to notice later edits.
    pub after_sha256: Option<String>,
}

/// A [`FileImage`] in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredImage {
    /// Contents, standard base64.
    pub base64: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

impl StoredImage {
    /// Stores an image.
    pub fn from_image(image: &FileImage) -> Self {
        StoredImage {
            base64: base64::engine::general_purpose::STANDARD.encode(&image.bytes),
            mode: image.mode,
            uid: image.uid,
            gid: image.gid,
        }
    }

    /// The stored image back.
    pub fn to_image(&self) -> Result<FileImage, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.base64)
            .map_err(|e| format!("bad base64: {e}"))?;
        Ok(FileImage {
            bytes,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
        })
    }
}

impl Default for State {
    fn default() -> Self {
        State {
            version: VERSION,
            files: Vec::new(),
            created_dirs: Vec::new(),
        }
    }
}

impl State {
    /// An empty record.
    pub fn new() -> Self {
        State::default()
    }

    /// Reads the record; `Ok(None)` when there is none (kmsbastion is not enabled).
    pub fn load(path: &Path) -> Result<Option<State>, String> {
        let image = files::read_image(path).map_err(|e| e.to_string())?;
        let Some(image) = image else { return Ok(None) };
        let state: State = serde_json::from_slice(&image.bytes).map_err(|e| e.to_string())?;
        if state.version != VERSION {
            return Err(format!("unsupported format version {}", state.version));
        }
        Ok(Some(state))
    }

    /// Writes the record atomically, mode 0600, owned by the caller.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
        let (uid, gid) = current_owner(path.parent().unwrap_or(Path::new("/")));
        files::write_image(
            path,
            &FileImage {
                bytes,
                mode: 0o600,
                uid,
                gid,
            },
        )
        .map_err(|e| e.to_string())
    }

    /// The entry for `path`, if `enable` touched it.
    pub fn file(&self, path: &str) -> Option<&TouchedFile> {
        self.files.iter().find(|f| f.path == path)
    }

    /// The recorded paths as absolute target paths.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| PathBuf::from(&f.path)).collect()
    }
}

/// Owner of a directory (new files take it, so unit tests need no privileges).
pub fn current_owner(dir: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir)
        .map(|m| (m.uid(), m.gid()))
        .unwrap_or((0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let mut state = State::new();
        state.files.push(TouchedFile {
            path: "/etc/nsswitch.conf".into(),
            original: Some(StoredImage::from_image(&FileImage {
                bytes: vec![0, 1, 2, 255],
                mode: 0o644,
                uid: 0,
                gid: 0,
            })),
            after_sha256: Some("ab".into()),
        });
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap(), Some(state.clone()));
        let image = files::read_image(&path).unwrap().unwrap();
        assert_eq!(image.mode, 0o600);
        assert_eq!(
            state
                .file("/etc/nsswitch.conf")
                .unwrap()
                .original
                .as_ref()
                .unwrap()
                .to_image()
                .unwrap()
                .bytes,
            vec![0, 1, 2, 255]
        );
        assert_eq!(State::load(&dir.path().join("none")).unwrap(), None);
    }
}
