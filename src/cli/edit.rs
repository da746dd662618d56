//! Editing `kmsbastion.toml` in place: the layout and comments an administrator wrote stay
//! exactly as they were, only the lines we add or change differ; the result is validated by
//! the real configuration parser before anything touches the disk, and written atomically
//! (temporary file in the same directory, same mode and owner, fsync, rename).
#![forbid(unsafe_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml_edit::{Array, ArrayOfTables, DocumentMut, InlineTable, Item, Table, Value};

/// Why an edit could not be made or written. The file on disk is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Shape { path: PathBuf, message: String },
    #[error("cannot write {path}: {source} (the file is unchanged)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} changed on disk while kmsbastion was editing it; nothing was written, run the command again")]
    Raced { path: PathBuf },
}

/// The configuration file as text plus its editable syntax tree.
pub struct ConfigDocument {
    path: PathBuf,
    original: String,
    doc: DocumentMut,
}

/// One `[[host.account]]` entry to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount {
    pub name: String,
    pub secret: String,
}

impl ConfigDocument {
    /// Reads and parses `path` (following a symlink: the link stays, its target is edited).
    pub fn load(path: &Path) -> Result<Self, EditError> {
        let real = fs::canonicalize(path).map_err(|source| EditError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let original = fs::read_to_string(&real).map_err(|source| EditError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(real, original)
    }

    /// Parses `text` as if read from `path` (tests, and `load`).
    pub fn from_text(path: PathBuf, original: String) -> Result<Self, EditError> {
        let doc = original
            .parse::<DocumentMut>()
            .map_err(|e| EditError::Syntax {
                path: path.clone(),
                message: e.to_string().trim_end().to_string(),
            })?;
        Ok(Self {
            path,
            original,
            doc,
        })
    }

    /// The file that will be written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text as read.
    pub fn original(&self) -> &str {
        &self.original
    }

    /// The text as it would be written now.
    pub fn render(&self) -> String {
        self.doc.to_string()
    }

    /// True when an edit changed the text.
    pub fn is_modified(&self) -> bool {
        self.render() != self.original
    }

    /// The `[[host]]` table named `host`.
    fn host_table(&mut self, host: &str) -> Result<&mut Table, EditError> {
        let path = self.path.clone();
        let hosts = self
            .doc
            .get_mut("host")
            .and_then(Item::as_array_of_tables_mut)
            .ok_or_else(|| EditError::Shape {
                path: path.clone(),
                message: "has no [[host]] tables".to_string(),
            })?;
        hosts
            .iter_mut()
            .find(|t| t.get("name").and_then(Item::as_str) == Some(host))
            .ok_or_else(|| EditError::Shape {
                path,
                message: format!("has no [[host]] named {host:?}"),
            })
    }

    /// Adds `account` under host `host` unless an entry with the same account name exists.
    /// Returns `Ok(true)` when added, `Ok(false)` when the same entry is already there, and an
    /// error when the account exists with a different secret (the administrator decides).
    pub fn add_account(&mut self, host: &str, account: &NewAccount) -> Result<bool, EditError> {
        let path = self.path.clone();
        let table = self.host_table(host)?;
        let indent = table_indent(table);
        let item = table
            .entry("account")
            .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
        match item {
            Item::ArrayOfTables(accounts) => {
                if let Some(existing) = accounts
                    .iter()
                    .find(|t| t.get("name").and_then(Item::as_str) == Some(account.name.as_str()))
                {
                    return same_or_conflict(&path, host, account, existing.get("secret").and_then(Item::as_str));
                }
                let indent = accounts
                    .iter()
                    .next()
                    .map(table_indent)
                    .unwrap_or_else(|| format!("{indent}  "));
                let mut t = Table::new();
                t.decor_mut().set_prefix(format!("\n{indent}"));
                t.insert("name", toml_edit::value(account.name.as_str()));
                t.insert("secret", toml_edit::value(account.secret.as_str()));
                for key in ["name", "secret"] {
                    if let Some(mut k) = t.key_mut(key) {
                        k.leaf_decor_mut().set_prefix(indent.clone());
                    }
                }
                accounts.push(t);
                Ok(true)
            }
            Item::Value(Value::Array(accounts)) => {
                if let Some(existing) = accounts.iter().filter_map(Value::as_inline_table).find(|t| {
                    t.get("name").and_then(Value::as_str) == Some(account.name.as_str())
                }) {
                    return same_or_conflict(&path, host, account, existing.get("secret").and_then(Value::as_str));
                }
                let mut t = InlineTable::new();
                t.insert("name", account.name.as_str().into());
                t.insert("secret", account.secret.as_str().into());
                accounts.push(t);
                Ok(true)
            }
            _ => Err(EditError::Shape {
                path,
                message: format!("host {host:?}: `account` is neither [[host.account]] tables nor an array of tables"),
            }),
        }
    }

    /// The host keys currently pinned for `host`.
    pub fn host_keys(&mut self, host: &str) -> Result<Vec<String>, EditError> {
        let table = self.host_table(host)?;
        Ok(table
            .get("host_keys")
            .and_then(Item::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Replaces the pinned host keys of `host` with `keys`, one per line.
    pub fn set_host_keys(&mut self, host: &str, keys: &[String]) -> Result<(), EditError> {
        let table = self.host_table(host)?;
        let indent = table_indent(table);
        let mut array = Array::new();
        for key in keys {
            let mut v = Value::from(key.as_str());
            v.decor_mut().set_prefix(format!("\n{indent}    "));
            array.push_formatted(v);
        }
        array.set_trailing(format!("\n{indent}"));
        array.set_trailing_comma(true);
        match table.get_mut("host_keys") {
            Some(Item::Value(existing)) => {
                // Keep whatever sits around the old value (spacing, a trailing comment).
                let decor = existing.decor().clone();
                let mut value = Value::Array(array);
                *value.decor_mut() = decor;
                *existing = value;
            }
            _ => {
                table.insert("host_keys", Item::Value(Value::Array(array)));
                if let Some(mut k) = table.key_mut("host_keys") {
                    k.leaf_decor_mut().set_prefix(indent);
                }
            }
        }
        Ok(())
    }

    /// Checks the edited text with `validate` (the real configuration parser) and writes it
    /// atomically. Does nothing when nothing changed. Refuses to write if the file changed on
    /// disk since it was read.
    pub fn save<E>(
        &self,
        validate: impl FnOnce(&str, &Path) -> Result<(), E>,
    ) -> Result<bool, SaveError<E>> {
        let text = self.render();
        if text == self.original {
            return Ok(false);
        }
        validate(&text, &self.path).map_err(SaveError::Invalid)?;
        write_atomically(&self.path, &self.original, &text).map_err(SaveError::Edit)?;
        Ok(true)
    }
}

/// The failure of [`ConfigDocument::save`].
#[derive(Debug)]
pub enum SaveError<E> {
    /// The edited configuration would not load; nothing was written.
    Invalid(E),
    /// Writing failed; the file is unchanged.
    Edit(EditError),
}

fn same_or_conflict(
    path: &Path,
    host: &str,
    account: &NewAccount,
    existing_secret: Option<&str>,
) -> Result<bool, EditError> {
    if existing_secret == Some(account.secret.as_str()) {
        Ok(false)
    } else {
        Err(EditError::Shape {
            path: path.to_path_buf(),
            message: format!(
                "{}@{host} already uses secret {:?}, not {:?}; remove that [[host.account]] first if the new secret should replace it",
                account.name,
                existing_secret.unwrap_or("?"),
                account.secret
            ),
        })
    }
}

/// The indentation in front of a table header (what follows the last newline of its prefix).
fn table_indent(table: &Table) -> String {
    let prefix = table
        .decor()
        .prefix()
        .and_then(|p| p.as_str())
        .unwrap_or("");
    let last_line = prefix.rsplit('\n').next().unwrap_or("");
    last_line
        .chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .collect()
}

/// Writes `text` to `path` via a temporary file in the same directory, with the mode and
/// owner of the existing file, after checking that the file still holds `expected`.
pub fn write_atomically(path: &Path, expected: &str, text: &str) -> Result<(), EditError> {
    let write_err = |source| EditError::Write {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(write_err)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kmsbastion.toml".to_string());
    let tmp = dir.join(format!(".{name}.kmsbastion-{}.tmp", std::process::id()));
    // Ok(false): the file changed under us; nothing renamed.
    let result = (|| -> std::io::Result<bool> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        // Keep the owner; only root can give a file away, and only root edits /etc.
        if let Err(e) = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())) {
            if e.kind() != std::io::ErrorKind::PermissionDenied {
                return Err(e);
            }
        }
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        drop(file);
        if fs::read(path)? != expected.as_bytes() {
            return Ok(false);
        }
        fs::rename(&tmp, path)?;
        if let Ok(d) = fs::File::open(dir) {
            // Best effort: the rename is durable once the directory is synced.
            let _ = d.sync_all();
        }
        Ok(true)
    })();
    match result {
        Ok(true) => Ok(()),
        Ok(false) => {
            let _ = fs::remove_file(&tmp);
            Err(EditError::Raced {
                path: path.to_path_buf(),
            })
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(write_err(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"# kmsbastion test configuration
[kms]
endpoint = "http://127.0.0.1:9100"

[[host]]
name = "web-01"   # the front end
address = "127.0.0.2"
instance_id = "i-web01"
  [[host.account]]
  name = "root"
  secret = "acs/ecs/web-01/root"

# second host, no accounts yet
[[host]]
name = "web-02"
address = "127.0.0.3"

[[engineer]]
name = "alice"
uid = 64001
"#;

    fn doc() -> ConfigDocument {
        ConfigDocument::from_text(PathBuf::from("/x/kmsbastion.toml"), CONFIG.to_string()).unwrap()
    }

    fn acct(name: &str, secret: &str) -> NewAccount {
        NewAccount {
            name: name.into(),
            secret: secret.into(),
        }
    }

    #[test]
    fn adds_accounts_in_place_keeping_comments_and_indentation() {
        let mut d = doc();
        assert!(d
            .add_account("web-01", &acct("deploy", "acs/ecs/web-01/deploy"))
            .unwrap());
        assert!(d
            .add_account("web-02", &acct("deploy", "acs/ecs/web-02/deploy"))
            .unwrap());
        let out = d.render();
        let want = CONFIG
            .replace(
                "  secret = \"acs/ecs/web-01/root\"\n",
                "  secret = \"acs/ecs/web-01/root\"\n\n  [[host.account]]\n  name = \"deploy\"\n  secret = \"acs/ecs/web-01/deploy\"\n",
            )
            .replace(
                "address = \"127.0.0.3\"\n",
                "address = \"127.0.0.3\"\n\n  [[host.account]]\n  name = \"deploy\"\n  secret = \"acs/ecs/web-02/deploy\"\n",
            );
        assert_eq!(out, want);
    }

    #[test]
    fn adding_the_same_account_twice_changes_nothing() {
        let mut d = doc();
        assert!(!d
            .add_account("web-01", &acct("root", "acs/ecs/web-01/root"))
            .unwrap());
        assert!(!d.is_modified());
        let err = d
            .add_account("web-01", &acct("root", "acs/ecs/other"))
            .unwrap_err();
        assert!(err.to_string().contains("already uses secret"), "{err}");
        assert!(d
            .add_account("db-01", &acct("root", "x"))
            .unwrap_err()
            .to_string()
            .contains("no [[host]] named"));
    }

    #[test]
    fn pins_host_keys_one_per_line_and_replaces_old_pins() {
        let mut d = doc();
        d.set_host_keys(
            "web-02",
            &[
                "ssh-ed25519 AAAA1".into(),
                "ecdsa-sha2-nistp256 AAAA2".into(),
            ],
        )
        .unwrap();
        let out = d.render();
        assert!(out.contains("address = \"127.0.0.3\"\nhost_keys = [\n    \"ssh-ed25519 AAAA1\",\n    \"ecdsa-sha2-nistp256 AAAA2\",\n]\n"), "{out}");
        assert_eq!(d.host_keys("web-02").unwrap().len(), 2);
        d.set_host_keys("web-02", &["ssh-ed25519 AAAA3".into()])
            .unwrap();
        assert_eq!(
            d.host_keys("web-02").unwrap(),
            vec!["ssh-ed25519 AAAA3".to_string()]
        );
        assert!(d.render().contains("# the front end"));
    }

    #[test]
    fn save_validates_then_writes_atomically_keeping_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsbastion.toml");
        fs::write(&path, CONFIG).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let mut d = ConfigDocument::load(&path).unwrap();
        d.add_account("web-02", &acct("deploy", "s")).unwrap();

        // A failing validation leaves the file alone.
        let r = d.save(|_, _| Err("no"));
        assert!(matches!(r, Err(SaveError::Invalid("no"))));
        assert_eq!(fs::read_to_string(&path).unwrap(), CONFIG);

        assert!(d.save(|_, _| Ok::<(), ()>(())).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), d.render());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn save_refuses_when_the_file_changed_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsbastion.toml");
        fs::write(&path, CONFIG).unwrap();
        let mut d = ConfigDocument::load(&path).unwrap();
        d.add_account("web-02", &acct("deploy", "s")).unwrap();
        fs::write(&path, "# edited by someone else\n").unwrap();
        assert!(matches!(
            d.save(|_, _| Ok::<(), ()>(())),
            Err(SaveError::Edit(EditError::Raced { .. }))
        ));
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "# edited by someone else\n"
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
