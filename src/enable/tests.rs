//! `enable`/`disable` on a fake root with a scripted sshd and pam-auth-update.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

const HOST_KEY: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBJtrLvb41FKXiPCARI2RUzeLkLryZuz9gWliB394aayfywXPtgHKr/RkLkMtlqtAPnzCWCf4uDBhh08NXJ78Flw=";
const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z alice@laptop";

const SSHD_CONFIG: &str = "# Debian 12\nInclude /etc/ssh/sshd_config.d/*.conf\n\nKbdInteractiveAuthentication no\nUsePAM yes\nX11Forwarding yes\nSubsystem sftp /usr/lib/openssh/sftp-server\n";
const NSSWITCH: &str = "# /etc/nsswitch.conf\n\npasswd:         files\ngroup:          files\nshadow:         files\nhosts:          files dns\n";
const COMMON_ACCOUNT: &str = "# here are the per-package modules (the \"Primary\" block)\naccount\t[success=1 new_authtok_reqd=done default=ignore]\tpam_unix.so\naccount\trequisite\t\t\tpam_deny.so\naccount\trequired\t\t\tpam_permit.so\n# end of pam-auth-update config\n";
const PAM_SSHD: &str = "#%PAM-1.0\nauth       substack     password-auth\naccount    required     pam_nologin.so\naccount    include      password-auth\nsession    include      password-auth\n";

fn config() -> String {
    format!(
        "[kms]\nendpoint = \"http://127.0.0.1:9100\"\ncredentials = \"file\"\ncredentials_file = \"/etc/kmsbastion/credentials\"\n\n\
         [[host]]\nname = \"web-01\"\naddress = \"127.0.0.2\"\nhost_keys = [\"{HOST_KEY}\"]\n  [[host.account]]\n  name = \"root\"\n  secret = \"acs/ecs/web-01/root\"\n\n\
         [[engineer]]\nname = \"alice\"\nuid = 64001\nkeys = [\"{KEY_A}\"]\n"
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Debian,
    Other,
}

/// A fake jump host: the files enable reads, with the helpers "installed".
fn fake_root(family: Family) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let put = |path: &str, text: &str, mode: u32| {
        let p = dir.path().join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    put("/etc/ssh/sshd_config", SSHD_CONFIG, 0o644);
    fs::create_dir_all(dir.path().join("etc/ssh/sshd_config.d")).unwrap();
    put("/etc/nsswitch.conf", NSSWITCH, 0o644);
    put("/etc/passwd", "root:x:0:0:root:/root:/bin/bash\nkmsbastion:x:999:999::/nonexistent:/usr/sbin/nologin\nadmin:x:1000:1000::/home/admin:/bin/bash\n", 0o644);
    put(
        "/etc/group",
        "root:x:0:\nkmsbastion:x:999:\nadmin:x:1000:\n",
        0o644,
    );
    put("/etc/kmsbastion/kmsbastion.toml", &config(), 0o644);
    put("/usr/sbin/sshd", "", 0o755);
    put("/usr/bin/kmsbastion", "", 0o755);
    put("/usr/libexec/kmsbastion/kmsbastion-keys", "", 0o755);
    put("/usr/libexec/kmsbastion/kmsbastion-connect", "", 0o755);
    put(
        "/usr/lib/x86_64-linux-gnu/security/pam_kmsbastion.so",
        "",
        0o644,
    );
    put(
        "/usr/lib/x86_64-linux-gnu/libnss_kmsbastion.so.2",
        "",
        0o644,
    );
    match family {
        Family::Debian => {
            put("/usr/sbin/pam-auth-update", "", 0o755);
            put("/etc/pam.d/common-account", COMMON_ACCOUNT, 0o644);
            put(
                "/etc/pam.d/common-session",
                "session\trequired\tpam_unix.so\n",
                0o644,
            );
            put("/etc/pam.d/sshd", "@include common-account\n", 0o644);
            put("/var/lib/pam/seen", "unix\n", 0o644);
            put(
                "/var/cache/debconf/config.dat",
                "Name: libpam-runtime/profiles\nValue: unix\n",
                0o644,
            );
            fs::create_dir_all(dir.path().join("usr/share/pam-configs")).unwrap();
        }
        Family::Other => put("/etc/pam.d/sshd", PAM_SSHD, 0o640),
    }
    dir
}

/// Every file and directory under `root` with contents and mode.
fn tree(root: &Path) -> BTreeMap<String, (Option<Vec<u8>>, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if meta.is_dir() {
                out.insert(rel, (None, meta.mode()));
                stack.push(path);
            } else {
                out.insert(rel, (Some(fs::read(&path).unwrap()), meta.mode()));
            }
        }
    }
    out
}

/// Knobs for the scripted programs.
#[derive(Default, Clone, Copy)]
struct Faults {
    /// `sshd -t` fails once the drop-in exists.
    t_fails_after: bool,
    /// `sshd -t` fails from the start.
    t_fails_before: bool,
    /// The drop-in's settings leak to local users (as a global setting would).
    leaks_to_locals: bool,
    /// An earlier drop-in wins for ForceCommand.
    shadowed: bool,
    /// pam-auth-update exits 0 but leaves common-* alone (local modifications).
    pam_refuses: bool,
    /// MaxStartups is first-match-wins (OpenSSH 10.1 and later) instead of last-wins.
    max_startups_first_wins: bool,
    /// sshd's built-in MaxStartups when no file sets one (a distribution's patch).
    patched_default: Option<&'static str>,
    /// Something sshd does not trace overrides the drop-in's MaxStartups.
    drop_in_max_startups_ignored: bool,
    /// `kmsbastion index` fails.
    index_fails: bool,
}

/// sshd and pam-auth-update, scripted against the fake root's files.
struct Scripted<'a> {
    root: &'a Path,
    faults: Faults,
}

impl Scripted<'_> {
    fn read(&self, path: &str) -> String {
        fs::read_to_string(under_root(self.root, Path::new(path))).unwrap_or_default()
    }

    /// The MaxStartups lines sshd reads, in its order: the main file with each `Include` of
    /// the drop-in directory expanded in place, sorted.
    fn max_startups_lines(&self) -> Vec<(String, usize, String)> {
        let setting = |line: &str| {
            sshd::parse(line)
                .global
                .into_iter()
                .next()
                .filter(|d| d.keyword == "maxstartups")
                .map(|d| d.value)
        };
        let mut found = Vec::new();
        for (n, line) in self.read(sshd::MAIN_CONFIG).lines().enumerate() {
            if line.starts_with("Include") {
                let dir = under_root(self.root, Path::new("/etc/ssh/sshd_config.d"));
                let mut names: Vec<String> = fs::read_dir(dir)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".conf"))
                    .collect();
                names.sort();
                for name in names {
                    let path = format!("/etc/ssh/sshd_config.d/{name}");
                    if path == sshd::DROP_IN_PATH && self.faults.drop_in_max_startups_ignored {
                        continue;
                    }
                    for (m, l) in self.read(&path).lines().enumerate() {
                        if let Some(v) = setting(l) {
                            found.push((path.clone(), m + 1, v));
                        }
                    }
                }
            } else if let Some(v) = setting(line) {
                found.push((sshd::MAIN_CONFIG.to_string(), n + 1, v));
            }
        }
        found
    }

    /// sshd's `-ddd` lines for the MaxStartups settings, among others.
    fn sshd_trace(&self) -> String {
        let mut out = format!(
            "debug2: load_server_config: filename {}\ndebug3: {}:4 setting KbdInteractiveAuthentication no\n",
            sshd::MAIN_CONFIG,
            sshd::MAIN_CONFIG
        );
        for (file, line, value) in self.max_startups_lines() {
            out.push_str(&format!(
                "debug3: {file}:{line} setting MaxStartups {value}\n"
            ));
        }
        out
    }

    fn sshd_dump(&self, user: &str) -> String {
        let mut settings: Vec<(String, String)> = [
            ("port", "22"),
            ("usepam", "yes"),
            ("x11forwarding", "yes"),
            ("permittty", "yes"),
            ("permituserrc", "yes"),
            ("disableforwarding", "no"),
            ("forcecommand", "none"),
            ("authorizedkeyscommand", "none"),
            ("authorizedkeyscommanduser", "none"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let lines = self.max_startups_lines();
        let winner = if self.faults.max_startups_first_wins {
            lines.first()
        } else {
            lines.last()
        };
        let max_startups = match winner {
            Some((_, _, v)) => v.clone(),
            None => self
                .faults
                .patched_default
                .unwrap_or(sshd::OPENSSH_DEFAULT_MAX_STARTUPS)
                .to_string(),
        };
        settings.push(("maxstartups".to_string(), max_startups));
        let drop_in = self.read(sshd::DROP_IN_PATH);
        // NSS puts the login into the bastion group only once nsswitch.conf names us.
        let in_group = self.read(NSSWITCH_PATH).contains("kmsbastion")
            && (user.contains('@') || user == "alice");
        if !drop_in.is_empty() && (in_group || self.faults.leaks_to_locals) {
            for d in sshd::parse(&drop_in).conditional {
                if self.faults.shadowed && d.keyword == "forcecommand" {
                    continue;
                }
                match settings.iter_mut().find(|(k, _)| *k == d.keyword) {
                    Some(slot) => slot.1 = d.value.clone(),
                    None => settings.push((d.keyword.clone(), d.value.clone())),
                }
            }
        }
        settings.iter().map(|(k, v)| format!("{k} {v}\n")).collect()
    }

    fn pam_auth_update(&self) {
        if self.faults.pam_refuses {
            return;
        }
        let profile = self.read(pam::PROFILE_PATH);
        assert!(profile.contains("Default: no"));
        let append = |path: &str, text: &str| {
            let p = under_root(self.root, Path::new(path));
            let mut old = fs::read_to_string(&p).unwrap_or_default();
            old.push_str(text);
            fs::write(&p, old).unwrap();
        };
        for line in pam::snippet_lines(pam::SNIPPET) {
            let file = format!("/etc/pam.d/common-{}", line.kind);
            append(
                &file,
                &format!("{}\t{}\t{}\n", line.kind, line.control, line.module),
            );
        }
        append("/var/lib/pam/seen", "kmsbastion\n");
        append(
            "/var/cache/debconf/config.dat",
            "Name: libpam-runtime/profiles\nValue: unix, kmsbastion\n",
        );
        // debconf keeps a backup of the previous database: a file enable did not plan.
        fs::write(
            under_root(self.root, Path::new("/var/cache/debconf/config.dat-old")),
            "old\n",
        )
        .unwrap();
    }
}

impl Scripted<'_> {
    fn pam_auth_update_remove(&self) {
        for kind in ["account", "session"] {
            let p = under_root(self.root, Path::new(&format!("/etc/pam.d/common-{kind}")));
            let kept: String = fs::read_to_string(&p)
                .unwrap()
                .split_inclusive('\n')
                .filter(|l| !l.contains("pam_kmsbastion.so"))
                .collect();
            fs::write(&p, kept).unwrap();
        }
        let db = under_root(self.root, Path::new("/var/cache/debconf/config.dat"));
        let mut text = fs::read_to_string(&db).unwrap();
        text.push_str("Value: unix\n");
        fs::write(&db, text).unwrap();
    }
}

impl Programs for Scripted<'_> {
    fn run(&self, program: &Path, args: &[String]) -> io::Result<Ran> {
        let ok = |stdout: String| {
            Ok(Ran {
                success: true,
                stdout,
                stderr: String::new(),
            })
        };
        let fail = |stderr: &str| {
            Ok(Ran {
                success: false,
                stdout: String::new(),
                stderr: stderr.into(),
            })
        };
        if program == Path::new(DEFAULT_SSHD) {
            match args.first().map(String::as_str) {
                Some("-t") => {
                    let installed = !self.read(sshd::DROP_IN_PATH).is_empty();
                    if self.faults.t_fails_before || (self.faults.t_fails_after && installed) {
                        return fail("/etc/ssh/sshd_config.d/00-kmsbastion.conf line 3: Bad configuration option");
                    }
                    ok(String::new())
                }
                Some("-T") => {
                    let spec = args.get(2).cloned().unwrap_or_default();
                    let user = spec
                        .strip_prefix("user=")
                        .and_then(|s| s.split(',').next())
                        .unwrap_or("");
                    let trace = if args.iter().any(|a| a == "-ddd") {
                        self.sshd_trace()
                    } else {
                        String::new()
                    };
                    Ok(Ran {
                        success: true,
                        stdout: self.sshd_dump(user),
                        stderr: trace,
                    })
                }
                _ => fail("unexpected sshd arguments"),
            }
        } else if program == Path::new(KMSBASTION_BIN) {
            assert_eq!(
                args,
                ["index", "--config", "/etc/kmsbastion/kmsbastion.toml"],
                "enable runs `kmsbastion index` on its configuration"
            );
            if self.faults.index_fails {
                return fail(
                    "kmsbastion: index not written: the configuration changed moments ago",
                );
            }
            ok("index: wrote /run/kmsbastion/index/0123456789abcdef.idx (900 bytes: 1 engineer(s), 1 host(s), 0 grant(s)) for /etc/kmsbastion/kmsbastion.toml in 2 ms\n".to_string())
        } else if program == Path::new(pam::PAM_AUTH_UPDATE) {
            match args {
                [p, e, k] if p == "--package" && e == "--enable" && k == "kmsbastion" => {
                    self.pam_auth_update()
                }
                [p, r, k] if p == "--package" && r == "--remove" && k == "kmsbastion" => {
                    self.pam_auth_update_remove()
                }
                _ => return fail("unexpected pam-auth-update arguments"),
            }
            ok(String::new())
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not scripted", program.display()),
            ))
        }
    }
}

fn opts(root: &Path) -> EnableOptions {
    EnableOptions {
        root: root.to_path_buf(),
        ..EnableOptions::default()
    }
}

fn read(root: &Path, path: &str) -> String {
    fs::read_to_string(under_root(root, Path::new(path))).unwrap()
}

#[test]
fn debian_enable_wires_everything_and_disable_restores_every_byte() {
    let root = fake_root(Family::Debian);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };

    let report = enable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::DROP_IN);
    assert!(nsswitch::is_enabled(&read(root.path(), NSSWITCH_PATH)));
    assert_eq!(
        read(root.path(), pam::PROFILE_PATH),
        pam::profile(&pam::snippet_lines(pam::SNIPPET))
    );
    assert!(pam::mentions_module(&read(
        root.path(),
        "/etc/pam.d/common-account"
    )));
    let state_meta = fs::metadata(under_root(root.path(), Path::new(STATE_PATH))).unwrap();
    assert_eq!(state_meta.mode() & 0o777, 0o600);
    let text = report.to_string();
    for needle in [
        "created       /etc/ssh/sshd_config.d/00-kmsbastion.conf",
        "modified      /etc/nsswitch.conf",
        "modified      /etc/pam.d/common-account",
        "created       /var/cache/debconf/config.dat-old",
        "ran           /usr/sbin/pam-auth-update --package --enable kmsbastion",
        "sshd -T for bastion login alice@root@web-01 has all",
        "sshd -T for local user root is identical to before apart from maxstartups",
        "sshd -T for local user admin is identical to before apart from maxstartups",
        "verified      sshd -T shows maxstartups 100:30:200, the drop-in's",
        "note          sets MaxStartups 100:30:200 in the drop-in, for bursts of logins",
        "note          lookup index rebuilt by `/usr/bin/kmsbastion index`: wrote /run/kmsbastion/index/",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }
    // The state records every file pam-auth-update touched, not just the planned ones.
    let state = State::load(&under_root(root.path(), Path::new(STATE_PATH)))
        .unwrap()
        .unwrap();
    let mut paths: Vec<&str> = state.files.iter().map(|f| f.path.as_str()).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/etc/nsswitch.conf",
            "/etc/pam.d/common-account",
            "/etc/pam.d/common-session",
            "/etc/ssh/sshd_config.d/00-kmsbastion.conf",
            "/usr/share/pam-configs/kmsbastion",
            "/var/cache/debconf/config.dat",
            "/var/cache/debconf/config.dat-old",
            "/var/lib/pam/seen",
        ]
    );

    let report = disable_with(&opts(root.path()), &programs).unwrap();
    assert!(
        report
            .to_string()
            .contains("restored 8 file(s) byte for byte"),
        "{report}"
    );
    assert_eq!(
        tree(root.path()),
        before,
        "disable must leave the root exactly as it was"
    );
}

#[test]
fn other_family_gets_a_marked_block_in_pam_d_sshd_and_disable_restores_mode_too() {
    let root = fake_root(Family::Other);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    enable_with(&opts(root.path()), &programs).unwrap();
    let service = read(root.path(), pam::SSHD_SERVICE);
    assert_eq!(
        service,
        pam::wire_service(PAM_SSHD, &pam::snippet_lines(pam::SNIPPET))
    );
    assert!(service.contains("# BEGIN kmsbastion account"));
    let mode = fs::metadata(under_root(root.path(), Path::new(pam::SSHD_SERVICE)))
        .unwrap()
        .mode();
    assert_eq!(mode & 0o777, 0o640, "an edited file keeps its mode");
    assert!(!root.path().join("usr/share/pam-configs").exists());
    disable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(tree(root.path()), before);
}

#[test]
fn enable_is_idempotent_and_disable_still_restores_the_first_originals() {
    let root = fake_root(Family::Debian);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    enable_with(&opts(root.path()), &programs).unwrap();
    let enabled = tree(root.path());
    let again = enable_with(&opts(root.path()), &programs).unwrap();
    assert!(
        again.changes.is_empty() && again.commands.is_empty(),
        "{again}"
    );
    assert!(
        again
            .to_string()
            .starts_with("kmsbastion enable: nothing to change"),
        "{again}"
    );
    assert_eq!(again.checks.len(), 5, "still verified: {again}");
    assert_eq!(
        tree(root.path()),
        enabled,
        "a second enable changes nothing, state included"
    );
    disable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(tree(root.path()), before);
    let twice = disable_with(&opts(root.path()), &programs).unwrap();
    assert!(twice.to_string().contains("not enabled"), "{twice}");
    assert_eq!(tree(root.path()), before);
}

#[test]
fn enable_repairs_a_reverted_file_and_keeps_the_original_record() {
    let root = fake_root(Family::Other);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    enable_with(&opts(root.path()), &programs).unwrap();
    // An administrator removes the drop-in by hand; enable puts it back.
    fs::remove_file(under_root(root.path(), Path::new(sshd::DROP_IN_PATH))).unwrap();
    let report = enable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(report.changes.len(), 1, "{report}");
    disable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(tree(root.path()), before);
}

fn assert_rolled_back(faults: Faults, family: Family, expect: &str) {
    let root = fake_root(family);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults,
    };
    let err = enable_with(&opts(root.path()), &programs).unwrap_err();
    assert!(err.to_string().contains(expect), "{expect:?} not in: {err}");
    assert_eq!(
        tree(root.path()),
        before,
        "after {err} the root must be untouched"
    );
}

#[test]
fn sshd_t_failing_after_the_change_rolls_everything_back() {
    let faults = Faults {
        t_fails_after: true,
        ..Faults::default()
    };
    assert_rolled_back(faults, Family::Debian, "sshd -t rejects the configuration");
    assert_rolled_back(faults, Family::Other, "every change was rolled back");
}

#[test]
fn a_change_for_local_users_rolls_back_so_admins_are_never_locked_out() {
    let faults = Faults {
        leaks_to_locals: true,
        ..Faults::default()
    };
    assert_rolled_back(
        faults,
        Family::Debian,
        "sshd -T for local user root changed",
    );
}

#[test]
fn a_shadowed_setting_rolls_back() {
    let faults = Faults {
        shadowed: true,
        ..Faults::default()
    };
    assert_rolled_back(
        faults,
        Family::Debian,
        "lacks: forcecommand /usr/libexec/kmsbastion/kmsbastion-connect",
    );
}

#[test]
fn pam_auth_update_leaving_common_files_alone_rolls_back() {
    let faults = Faults {
        pam_refuses: true,
        ..Faults::default()
    };
    assert_rolled_back(
        faults,
        Family::Debian,
        "still does not call pam_kmsbastion.so",
    );
}

#[test]
fn a_broken_sshd_config_is_refused_before_any_change() {
    let faults = Faults {
        t_fails_before: true,
        ..Faults::default()
    };
    assert_rolled_back(
        faults,
        Family::Debian,
        "rejects the current configuration before any change",
    );
}

#[test]
fn refuses_without_include_and_never_edits_the_main_config() {
    let root = fake_root(Family::Debian);
    let main = under_root(root.path(), Path::new(sshd::MAIN_CONFIG));
    fs::write(&main, SSHD_CONFIG.replace("Include", "#Include")).unwrap();
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    let err = enable_with(&opts(root.path()), &programs).unwrap_err();
    assert!(matches!(err, EnableError::NotIncluded { .. }), "{err}");
    assert!(err
        .to_string()
        .contains("Include /etc/ssh/sshd_config.d/*.conf"));
    assert_eq!(tree(root.path()), before);
}

#[test]
fn refuses_when_the_pam_module_is_not_installed() {
    let root = fake_root(Family::Debian);
    fs::remove_file(
        root.path()
            .join("usr/lib/x86_64-linux-gnu/security/pam_kmsbastion.so"),
    )
    .unwrap();
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    let err = enable_with(&opts(root.path()), &programs).unwrap_err();
    assert!(
        err.to_string()
            .contains("the PAM module (pam_kmsbastion.so) is not installed"),
        "{err}"
    );
    assert_eq!(tree(root.path()), before);
}

#[test]
fn refuses_a_config_without_engineers() {
    let root = fake_root(Family::Debian);
    let cfg = config();
    let cut = cfg.find("[[engineer]]").unwrap();
    fs::write(
        root.path().join("etc/kmsbastion/kmsbastion.toml"),
        &cfg[..cut],
    )
    .unwrap();
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    let err = enable_with(&opts(root.path()), &programs).unwrap_err();
    assert!(err.to_string().contains("defines no engineer"), "{err}");
}

#[test]
fn dry_run_shows_the_diffs_and_changes_nothing() {
    let root = fake_root(Family::Debian);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    let o = EnableOptions {
        dry_run: true,
        ..opts(root.path())
    };
    let report = enable_with(&o, &programs).unwrap();
    assert_eq!(tree(root.path()), before);
    let text = report.to_string();
    for needle in [
        "kmsbastion enable --dry-run: nothing was changed",
        "would create  /etc/ssh/sshd_config.d/00-kmsbastion.conf",
        "would run     /usr/sbin/pam-auth-update --package --enable kmsbastion",
        "--- /dev/null\n+++ /etc/ssh/sshd_config.d/00-kmsbastion.conf\n",
        "--- /etc/nsswitch.conf\n+++ /etc/nsswitch.conf\n",
        "-passwd:         files\n-group:          files\n+passwd:         files kmsbastion\n+group:          files kmsbastion\n",
        "+Default: no\n",
        "+MaxStartups 100:30:200\n",
        "note          would set MaxStartups 100:30:200 in the drop-in",
        "`/usr/bin/kmsbastion index` would rebuild",
    ] {
        assert!(text.contains(needle), "{needle:?} not in:\n{text}");
    }

    // disable --dry-run after a real enable: the reverse diffs, nothing changed.
    let real = opts(root.path());
    enable_with(&real, &programs).unwrap();
    let enabled = tree(root.path());
    let report = disable_with(&o, &programs).unwrap();
    assert_eq!(tree(root.path()), enabled);
    let text = report.to_string();
    assert!(
        text.contains("would remove  /etc/ssh/sshd_config.d/00-kmsbastion.conf"),
        "{text}"
    );
    assert!(text.contains("+passwd:         files\n"), "{text}");
}

#[test]
fn disable_keeps_later_edits_and_removes_only_our_lines() {
    let root = fake_root(Family::Debian);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    enable_with(&opts(root.path()), &programs).unwrap();
    let nss = under_root(root.path(), Path::new(NSSWITCH_PATH));
    let edited = format!("{}netgroup:       nis\n", fs::read_to_string(&nss).unwrap());
    fs::write(&nss, &edited).unwrap();
    let report = disable_with(&opts(root.path()), &programs).unwrap();
    assert!(
        report
            .to_string()
            .contains("/etc/nsswitch.conf changed after enable"),
        "{report}"
    );
    assert_eq!(
        fs::read_to_string(&nss).unwrap(),
        format!("{NSSWITCH}netgroup:       nis\n")
    );
    let mut after = tree(root.path());
    let mut expected = before;
    after.remove("etc/nsswitch.conf");
    expected.remove("etc/nsswitch.conf");
    assert_eq!(after, expected, "every other file is back byte for byte");
}

#[test]
fn disable_after_another_package_ran_pam_auth_update_removes_the_profile_instead() {
    let root = fake_root(Family::Debian);
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    enable_with(&opts(root.path()), &programs).unwrap();
    // Another package's postinst: a new profile in the stacks, a debconf answer.
    let common = under_root(root.path(), Path::new("/etc/pam.d/common-account"));
    let mut text = fs::read_to_string(&common).unwrap();
    text.push_str("account\toptional\tpam_other.so\n");
    fs::write(&common, &text).unwrap();
    let debconf = under_root(root.path(), Path::new("/var/cache/debconf/config.dat"));
    let mut db = fs::read_to_string(&debconf).unwrap();
    db.push_str("Name: other/question\n");
    fs::write(&debconf, &db).unwrap();

    let dry = EnableOptions {
        dry_run: true,
        ..opts(root.path())
    };
    let shown = disable_with(&dry, &programs).unwrap().to_string();
    assert!(
        shown.contains("would run     /usr/sbin/pam-auth-update --package --remove kmsbastion"),
        "{shown}"
    );
    assert!(
        fs::read_to_string(&common)
            .unwrap()
            .contains("pam_kmsbastion.so"),
        "dry run changed nothing"
    );

    let report = disable_with(&opts(root.path()), &programs).unwrap();
    assert!(
        report
            .to_string()
            .contains("ran           /usr/sbin/pam-auth-update --package --remove kmsbastion"),
        "{report}"
    );
    let common_now = fs::read_to_string(&common).unwrap();
    assert!(
        !common_now.contains("pam_kmsbastion.so") && common_now.contains("pam_other.so"),
        "{common_now}"
    );
    assert!(fs::read_to_string(&debconf)
        .unwrap()
        .contains("Name: other/question"));
    assert_eq!(read(root.path(), NSSWITCH_PATH), NSSWITCH);
    assert!(!under_root(root.path(), Path::new(sshd::DROP_IN_PATH)).exists());
    assert!(!under_root(root.path(), Path::new(pam::PROFILE_PATH)).exists());
    assert!(!under_root(root.path(), Path::new(STATE_PATH)).exists());
}

#[test]
fn disable_refuses_when_the_record_is_unexpected_and_changes_nothing() {
    let root = fake_root(Family::Other);
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    enable_with(&opts(root.path()), &programs).unwrap();
    // A record of a file disable knows no safe partial undo for, changed since.
    let state_path = under_root(root.path(), Path::new(STATE_PATH));
    let mut state = State::load(&state_path).unwrap().unwrap();
    state.files.push(TouchedFile {
        path: "/etc/passwd".into(),
        original: None,
        after_sha256: Some("0".repeat(64)),
    });
    state.save(&state_path).unwrap();
    let enabled = tree(root.path());
    let err = disable_with(&opts(root.path()), &programs).unwrap_err();
    assert!(
        matches!(&err, EnableError::Drift(p) if p == &[PathBuf::from("/etc/passwd")]),
        "{err}"
    );
    assert_eq!(tree(root.path()), enabled);
}

#[test]
fn refuses_a_bastion_group_the_drop_in_does_not_match() {
    let root = fake_root(Family::Debian);
    let cfg = config().replace(
        "[[host]]",
        "[bastion]\ngroup = \"jumpers\"\ngid = 64000\n\n[[host]]",
    );
    fs::write(root.path().join("etc/kmsbastion/kmsbastion.toml"), cfg).unwrap();
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    let err = enable_with(&opts(root.path()), &programs).unwrap_err();
    assert!(
        err.to_string().contains("[bastion] group is \"jumpers\""),
        "{err}"
    );
    assert_eq!(tree(root.path()), before);
}

/// The main sshd_config with a MaxStartups line after the Include (line 8).
fn admin_sets_max_startups(root: &Path, value: &str) {
    let main = under_root(root, Path::new(sshd::MAIN_CONFIG));
    let text = fs::read_to_string(&main).unwrap();
    fs::write(&main, format!("{text}MaxStartups {value}\n")).unwrap();
}

#[test]
fn an_administrators_max_startups_is_kept_and_disable_restores_every_byte() {
    for first_wins in [false, true] {
        for in_drop_in in [false, true] {
            let root = fake_root(Family::Debian);
            let place = if in_drop_in {
                let site = root.path().join("etc/ssh/sshd_config.d/50-site.conf");
                fs::write(site, "# site policy\nMaxStartups 50:30:100\n").unwrap();
                "/etc/ssh/sshd_config.d/50-site.conf line 2"
            } else {
                admin_sets_max_startups(root.path(), "50:30:100");
                "/etc/ssh/sshd_config line 8"
            };
            let before = tree(root.path());
            let programs = Scripted {
                root: root.path(),
                faults: Faults {
                    max_startups_first_wins: first_wins,
                    ..Faults::default()
                },
            };
            let report = enable_with(&opts(root.path()), &programs).unwrap();
            assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::drop_in(false));
            let text = report.to_string();
            for needle in [
                format!("note          keeping your MaxStartups 50:30:100 ({place}); the drop-in leaves its 100:30:200 out"),
                "verified      sshd -T shows maxstartups 50:30:100, yours, kept".to_string(),
                "sshd -T for local user root is identical to before\n".to_string(),
            ] {
                assert!(text.contains(&needle), "{needle:?} not in:\n{text}");
            }
            disable_with(&opts(root.path()), &programs).unwrap();
            assert_eq!(tree(root.path()), before);
        }
    }
}

#[test]
fn even_the_default_written_out_is_the_administrators_choice() {
    let root = fake_root(Family::Other);
    admin_sets_max_startups(root.path(), "10:30:100");
    let programs = Scripted {
        root: root.path(),
        faults: Faults {
            max_startups_first_wins: true,
            ..Faults::default()
        },
    };
    let report = enable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::drop_in(false));
    assert!(
        report
            .to_string()
            .contains("keeping your MaxStartups 10:30:100 (/etc/ssh/sshd_config line 8)"),
        "{report}"
    );
}

#[test]
fn keep_max_startups_leaves_the_line_out_and_says_so() {
    let root = fake_root(Family::Debian);
    let before = tree(root.path());
    let programs = Scripted {
        root: root.path(),
        faults: Faults::default(),
    };
    let keep = EnableOptions {
        keep_max_startups: true,
        ..opts(root.path())
    };
    let dry = enable_with(
        &EnableOptions {
            dry_run: true,
            ..keep.clone()
        },
        &programs,
    )
    .unwrap()
    .to_string();
    assert!(
        dry.contains("+# MaxStartups 100:30:200: left out by `kmsbastion enable`"),
        "{dry}"
    );
    assert!(!dry.contains("+MaxStartups"), "{dry}");
    let report = enable_with(&keep, &programs).unwrap().to_string();
    assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::drop_in(false));
    assert!(
        report.contains("keeping your MaxStartups 10:30:100 (--keep-max-startups)"),
        "{report}"
    );
    assert!(
        report.contains("sshd -T for local user root is identical to before\n"),
        "{report}"
    );
    // Once ours is in place, --keep-max-startups takes it out again.
    enable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::DROP_IN);
    let report = enable_with(&keep, &programs).unwrap().to_string();
    assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::drop_in(false));
    assert!(
        report.contains("modified      /etc/ssh/sshd_config.d/00-kmsbastion.conf"),
        "{report}"
    );
    disable_with(&opts(root.path()), &programs).unwrap();
    assert_eq!(tree(root.path()), before);
}

#[test]
fn a_patched_default_without_any_line_is_kept() {
    let root = fake_root(Family::Debian);
    let programs = Scripted {
        root: root.path(),
        faults: Faults {
            patched_default: Some("30:30:100"),
            ..Faults::default()
        },
    };
    let report = enable_with(&opts(root.path()), &programs)
        .unwrap()
        .to_string();
    assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::drop_in(false));
    assert!(
        report.contains("keeping your MaxStartups 30:30:100 (sshd's own default here"),
        "{report}"
    );
}

#[test]
fn a_max_startups_set_after_enable_wins_on_the_next_run() {
    for first_wins in [false, true] {
        let root = fake_root(Family::Debian);
        let before = tree(root.path());
        let programs = Scripted {
            root: root.path(),
            faults: Faults {
                max_startups_first_wins: first_wins,
                ..Faults::default()
            },
        };
        enable_with(&opts(root.path()), &programs).unwrap();
        assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::DROP_IN);
        admin_sets_max_startups(root.path(), "30:30:60");
        let report = enable_with(&opts(root.path()), &programs)
            .unwrap()
            .to_string();
        assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::drop_in(false));
        for needle in [
            "modified      /etc/ssh/sshd_config.d/00-kmsbastion.conf",
            "keeping your MaxStartups 30:30:60 (/etc/ssh/sshd_config line 8)",
            "sshd -T shows maxstartups 30:30:60, yours, kept",
        ] {
            assert!(report.contains(needle), "{needle:?} not in:\n{report}");
        }
        // disable removes our drop-in and keeps the administrator's own sshd_config.
        disable_with(&opts(root.path()), &programs).unwrap();
        let mut after = tree(root.path());
        let mut expected = before;
        after.remove("etc/ssh/sshd_config");
        expected.remove("etc/ssh/sshd_config");
        assert_eq!(after, expected);
    }
}

#[test]
fn a_max_startups_sshd_does_not_apply_rolls_back() {
    let faults = Faults {
        drop_in_max_startups_ignored: true,
        ..Faults::default()
    };
    assert_rolled_back(
        faults,
        Family::Debian,
        "sshd -T shows maxstartups 10:30:100, not the drop-in's 100:30:200",
    );
}

#[test]
fn the_lookup_index_is_rebuilt_after_enable_and_its_failure_is_only_a_note() {
    let root = fake_root(Family::Debian);
    let programs = Scripted {
        root: root.path(),
        faults: Faults {
            index_fails: true,
            ..Faults::default()
        },
    };
    let report = enable_with(&opts(root.path()), &programs).unwrap();
    assert!(
        report.to_string().contains(
            "note          lookup index not rebuilt (kmsbastion: index not written: the configuration changed moments ago); logins work without it"
        ),
        "{report}"
    );
    assert_eq!(read(root.path(), sshd::DROP_IN_PATH), sshd::DROP_IN);
    // A second, no-change run rebuilds it too; without the command it says so.
    let again = enable_with(
        &opts(root.path()),
        &Scripted {
            root: root.path(),
            faults: Faults::default(),
        },
    )
    .unwrap()
    .to_string();
    assert!(again.contains("nothing to change"), "{again}");
    assert!(
        again.contains("lookup index rebuilt by `/usr/bin/kmsbastion index`: wrote"),
        "{again}"
    );
    fs::remove_file(root.path().join("usr/bin/kmsbastion")).unwrap();
    let without = enable_with(&opts(root.path()), &programs)
        .unwrap()
        .to_string();
    assert!(
        without.contains("lookup index not rebuilt: /usr/bin/kmsbastion is not installed"),
        "{without}"
    );
}
