//! The passwd and group entries the NSS module serves, computed from the configuration.
//!
//! * passwd by name: a plain engineer (`alice`), or a composite login `alice@root@web-01`
//!   whose engineer, host and account all exist; both get the engineer's uid, the bastion
//!   gid, the fixed home and the `kmsbastion-connect` shell; GECOS `kmsbastion alice` or
//!   `kmsbastion alice -> root@web-01`.
//! * passwd by uid: the plain engineer (a uid maps back to exactly one name).
//! * enumeration: plain engineers only (composite names are unbounded in number).
//! * group by name or gid: the bastion group, with the engineers as members.
//! * initgroups: the bastion gid for any of our names.
//!
//! Existence only: NSS never evaluates grants (time, source). A composite name resolves even
//! when no grant allows it right now; the AuthorizedKeysCommand and PAM enforce the grant.
#![forbid(unsafe_code)]

use crate::config::Config;
use crate::login::Login;

/// `pw_passwd` of every entry: no password can ever match (`*`), and not `x`, so nothing goes
/// looking for a shadow entry that does not exist.
pub const NO_PASSWORD: &str = "*";
/// Prefix of the GECOS field, so `getent passwd` shows where an entry comes from. The field
/// never contains `:` (the passwd file separator) or `,` (the GECOS subfield separator).
pub const GECOS_PREFIX: &str = "kmsbastion";

/// One passwd entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    /// `pw_name`
    pub name: String,
    /// `pw_passwd` (always [`NO_PASSWORD`])
    pub passwd: String,
    /// `pw_uid`
    pub uid: u32,
    /// `pw_gid` (the bastion gid)
    pub gid: u32,
    /// `pw_gecos`
    pub gecos: String,
    /// `pw_dir`
    pub dir: String,
    /// `pw_shell`
    pub shell: String,
}

/// One group entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    /// `gr_name`
    pub name: String,
    /// `gr_passwd` (always [`NO_PASSWORD`])
    pub passwd: String,
    /// `gr_gid`
    pub gid: u32,
    /// `gr_mem`: the plain engineer names.
    pub members: Vec<String>,
}

fn entry(cfg: &Config, name: String, uid: u32, gecos: String) -> PasswdEntry {
    PasswdEntry {
        name,
        passwd: NO_PASSWORD.to_owned(),
        uid,
        gid: cfg.bastion.gid,
        gecos,
        dir: cfg.bastion.home.to_string_lossy().into_owned(),
        shell: cfg.bastion.shell.to_string_lossy().into_owned(),
    }
}

/// The entry of a plain engineer.
fn plain(cfg: &Config, engineer: &crate::config::Engineer) -> PasswdEntry {
    entry(
        cfg,
        engineer.name.clone(),
        engineer.uid,
        format!("{GECOS_PREFIX} {}", engineer.name),
    )
}

/// passwd lookup by name (plain engineer or existing composite login).
pub fn passwd_by_name(cfg: &Config, name: &str) -> Option<PasswdEntry> {
    match Login::parse(name).ok()? {
        Login::Plain(e) => cfg.engineer(&e).map(|e| plain(cfg, e)),
        Login::Composite(l) => {
            let engineer = cfg.engineer(&l.engineer)?;
            cfg.account(&l.host, &l.account)?;
            let gecos = format!("{GECOS_PREFIX} {} -> {}@{}", l.engineer, l.account, l.host);
            Some(entry(cfg, l.to_string(), engineer.uid, gecos))
        }
    }
}

/// passwd lookup by uid: the plain engineer with that uid.
pub fn passwd_by_uid(cfg: &Config, uid: u32) -> Option<PasswdEntry> {
    cfg.engineer_by_uid(uid).map(|e| plain(cfg, e))
}

/// Every entry served by enumeration (`getent passwd`): the plain engineers.
pub fn passwd_all(cfg: &Config) -> Vec<PasswdEntry> {
    cfg.engineers.iter().map(|e| plain(cfg, e)).collect()
}

/// The bastion group.
pub fn bastion_group(cfg: &Config) -> GroupEntry {
    GroupEntry {
        name: cfg.bastion.group.clone(),
        passwd: NO_PASSWORD.to_owned(),
        gid: cfg.bastion.gid,
        members: cfg.engineers.iter().map(|e| e.name.clone()).collect(),
    }
}

/// group lookup by name.
pub fn group_by_name(cfg: &Config, name: &str) -> Option<GroupEntry> {
    (cfg.bastion.group == name).then(|| bastion_group(cfg))
}

/// group lookup by gid.
pub fn group_by_gid(cfg: &Config, gid: u32) -> Option<GroupEntry> {
    (cfg.bastion.gid == gid).then(|| bastion_group(cfg))
}

/// Every group served by enumeration: the bastion group.
pub fn group_all(cfg: &Config) -> Vec<GroupEntry> {
    vec![bastion_group(cfg)]
}

/// The groups `initgroups` adds for `user`: the bastion gid for our names, nothing otherwise.
pub fn initgroups(cfg: &Config, user: &str) -> Option<u32> {
    passwd_by_name(cfg, user).map(|_| cfg.bastion.gid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z a";

    fn cfg() -> Config {
        let text = format!(
            r#"
[kms]
region = "cn-hangzhou"
[bastion]
home = "/var/empty"
[[host]]
name = "web-01"
address = "127.0.0.2"
  [[host.account]]
  name = "root"
  secret = "s1"
[[engineer]]
name = "alice"
uid = 64001
keys = ["{KEY}"]
[[engineer]]
name = "bob"
uid = 64002
"#
        );
        Config::parse(&text, Path::new("/t.toml")).unwrap()
    }

    #[test]
    fn plain_and_composite_entries() {
        let c = cfg();
        let alice = passwd_by_name(&c, "alice").unwrap();
        assert_eq!(
            alice,
            PasswdEntry {
                name: "alice".into(),
                passwd: "*".into(),
                uid: 64001,
                gid: 64000,
                gecos: "kmsbastion alice".into(),
                dir: "/var/empty".into(),
                shell: "/usr/libexec/kmsbastion/kmsbastion-connect".into(),
            }
        );
        let comp = passwd_by_name(&c, "alice@root@web-01").unwrap();
        assert_eq!(comp.name, "alice@root@web-01");
        assert_eq!((comp.uid, comp.gid), (64001, 64000));
        assert_eq!(comp.gecos, "kmsbastion alice -> root@web-01");
        assert_eq!(comp.shell, alice.shell);
        // bob has no grant: existence only, the entry still resolves
        assert!(passwd_by_name(&c, "bob@root@web-01").is_some());
    }

    #[test]
    fn unknown_and_hostile_names() {
        let c = cfg();
        for n in [
            "carol",
            "carol@root@web-01",
            "alice@admin@web-01",
            "alice@root@web-02",
            "alice@root",
            "alice@root@web-01@x",
            "alice\n",
            "alice@root@../etc",
            "%s%n",
            "",
            &"a".repeat(10_000),
            "root",
        ] {
            assert!(passwd_by_name(&c, n).is_none(), "{n:?}");
            assert!(initgroups(&c, n).is_none(), "{n:?}");
        }
    }

    #[test]
    fn uid_enumeration_groups() {
        let c = cfg();
        assert_eq!(passwd_by_uid(&c, 64002).unwrap().name, "bob");
        assert!(passwd_by_uid(&c, 0).is_none());
        let all: Vec<String> = passwd_all(&c).into_iter().map(|e| e.name).collect();
        assert_eq!(all, ["alice", "bob"]);
        let g = group_by_name(&c, "kmsbastion-engineers").unwrap();
        assert_eq!(
            (g.gid, g.members.clone()),
            (64000, vec!["alice".to_owned(), "bob".to_owned()])
        );
        assert_eq!(group_by_gid(&c, 64000), Some(g.clone()));
        assert_eq!(group_all(&c), vec![g]);
        assert!(group_by_gid(&c, 0).is_none());
        assert!(group_by_name(&c, "root").is_none());
        assert_eq!(initgroups(&c, "alice"), Some(64000));
        assert_eq!(initgroups(&c, "alice@root@web-01"), Some(64000));
    }
}
