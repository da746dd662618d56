//! The jump host's own users and groups, read from `/etc/passwd` and `/etc/group` directly.
//!
//! Never through NSS: this code runs inside our own NSS module, and asking glibc would recurse
//! into it. Validation uses this to keep the bastion's names and ids clear of local ones.
#![forbid(unsafe_code)]

use std::io;
use std::path::Path;

/// Local passwd file read by [`LocalDb::system`].
pub const LOCAL_PASSWD_PATH: &str = "/etc/passwd";
/// Local group file read by [`LocalDb::system`].
pub const LOCAL_GROUP_PATH: &str = "/etc/group";

/// Local user and group names with their ids (the seam for validation tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalDb {
    /// `(name, uid)` of every local user.
    pub users: Vec<(String, u32)>,
    /// `(name, gid)` of every local group.
    pub groups: Vec<(String, u32)>,
}

impl LocalDb {
    /// Reads the host's `/etc/passwd` and `/etc/group`.
    pub fn system() -> io::Result<LocalDb> {
        LocalDb::read(Path::new(LOCAL_PASSWD_PATH), Path::new(LOCAL_GROUP_PATH))
    }

    /// Reads a passwd-format and a group-format file.
    pub fn read(passwd: &Path, group: &Path) -> io::Result<LocalDb> {
        let p = std::fs::read(passwd)?;
        let g = std::fs::read(group)?;
        Ok(LocalDb::from_texts(
            &String::from_utf8_lossy(&p),
            &String::from_utf8_lossy(&g),
        ))
    }

    /// Parses passwd- and group-format text (`name:x:id:…`). Lines that do not have a
    /// numeric third field (comments, NIS `+` entries) are skipped.
    pub fn from_texts(passwd: &str, group: &str) -> LocalDb {
        LocalDb {
            users: name_ids(passwd),
            groups: name_ids(group),
        }
    }

    /// The uid of a local user with this name.
    pub fn user(&self, name: &str) -> Option<u32> {
        self.users
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    /// The gid of a local group with this name.
    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }
}

fn name_ids(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _pw = f.next()?;
            let id = f.next()?.parse().ok()?;
            (!name.is_empty() && !name.starts_with('#')).then(|| (name.to_owned(), id))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_group() {
        let db = LocalDb::from_texts(
            "root:x:0:0:root:/root:/bin/bash\n# comment\n+nis\nbroken\nadmin:x:1000:1000::/home/admin:/bin/sh\n",
            "root:x:0:\nsudo:x:27:admin\n",
        );
        assert_eq!(db.user("admin"), Some(1000));
        assert_eq!(db.user("nis"), None);
        assert_eq!(db.users.len(), 2);
        assert_eq!(db.group("sudo"), Some(27));
    }
}
