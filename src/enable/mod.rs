//! `kmsbastion enable` / `disable`: wire a jump host's sshd, PAM and NSS to kmsbastion, prove
//! that it took effect, and put every byte back on `disable`.
//!
//! `enable` (every path under [`EnableOptions::root`]):
//! 1. checks that the main `sshd_config` `Include`s `sshd_config.d/*.conf` (it never edits
//!    the main file), that the helpers, the PAM module and the NSS module are installed, and
//!    that the configuration names a bastion login to verify with;
//! 2. installs the sshd drop-in as [`sshd::DROP_IN_PATH`] (with `MaxStartups` sized for bursts
//!    of logins unless the administrator set MaxStartups: see [`sshd::choose_max_startups`]),
//!    adds `kmsbastion` to the `passwd:` and `group:` lines of `nsswitch.conf`, and wires
//!    PAM: a pam-auth-update profile plus
//!    `pam-auth-update --package --enable kmsbastion` where pam-auth-update exists, a marked
//!    block in `/etc/pam.d/sshd` elsewhere;
//! 3. verifies with `sshd -t` and `sshd -T -C user=…`: a bastion login gets every setting of
//!    the drop-in, `MaxStartups` is the value decided in step 2, and local users' effective
//!    settings are otherwise byte-identical to before (the global authentication settings are
//!    never touched, so local administrators cannot be locked out; `MaxStartups` only
//!    throttles connections before authentication). Any failure rolls back everything this
//!    run changed;
//! 4. runs `kmsbastion index` to rebuild the configuration's lookup index (a cache in
//!    `/run`, not recorded: logins work without it, so its failure is only a note).
//!
//! The original image (bytes, mode, owner) of every file it changes is kept in
//! [`state::STATE_PATH`]; `disable` restores them exactly and removes what `enable` created.
//! A file edited after `enable` (an administrator's change, another package's
//! pam-auth-update or debconf run) is not overwritten: `disable` takes only kmsbastion's lines
//! out of it (`pam-auth-update --remove` for the PAM stacks) and says so. Running `enable`
//! twice changes nothing the second time.
#![forbid(unsafe_code)]

pub mod diff;
pub mod files;
pub mod nsswitch;
pub mod pam;
pub mod sshd;
pub mod state;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::{Config, LocalDb, LOCAL_GROUP_PATH, LOCAL_PASSWD_PATH};
use files::{read_image, under_root, FileImage};
use state::{State, StoredImage, TouchedFile, STATE_PATH};

/// glibc's NSS configuration.
pub const NSSWITCH_PATH: &str = "/etc/nsswitch.conf";
/// The NSS module file name.
pub const NSS_LIBRARY: &str = "libnss_kmsbastion.so.2";
/// The directories where the NSS module may live, per distribution family.
pub const LIBRARY_DIRS: [&str; 5] = [
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
];
/// debconf's password database (`passwords.dat`, `passwords.dat-old`): never snapshotted.
const DEBCONF_PASSWORDS: &str = "passwords.dat";
/// The administrator's command on the target system; `enable` ends with its `index`.
pub const KMSBASTION_BIN: &str = "/usr/bin/kmsbastion";
/// The sshd binary used when none is given.
pub const DEFAULT_SSHD: &str = "/usr/sbin/sshd";
/// Host name and address used in `sshd -T -C` connection specs.
const CHECK_HOST: &str = "kmsbastion-enable-check";
const CHECK_ADDR: &str = "127.0.0.1";

/// What `enable` and `disable` act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnableOptions {
    /// The system's root: `/` normally; a chroot or test root otherwise. With another root,
    /// programs (sshd, pam-auth-update) run under `chroot ROOT`.
    pub root: PathBuf,
    /// Show what would change (unified diffs) and change nothing.
    pub dry_run: bool,
    /// The sshd binary, as a path on the target system.
    pub sshd: PathBuf,
    /// The kmsbastion configuration, as a path on the target system; `enable` takes the
    /// bastion login it verifies with from it.
    pub config: PathBuf,
    /// Never set sshd's `MaxStartups` (`--keep-max-startups`): install the drop-in without
    /// its `MaxStartups` line even where no other file sets one.
    pub keep_max_startups: bool,
}

impl Default for EnableOptions {
    fn default() -> Self {
        EnableOptions {
            root: PathBuf::from("/"),
            dry_run: false,
            sshd: PathBuf::from(DEFAULT_SSHD),
            config: PathBuf::from(crate::config::DEFAULT_CONFIG_PATH),
            keep_max_startups: false,
        }
    }
}

/// Why `enable` or `disable` did not complete. Every message says what to do; after an
/// error the system is as it was before the command.
#[derive(Debug)]
pub enum EnableError {
    /// Reading or writing a file failed.
    Io {
        /// The file (target path).
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A program could not be started.
    Spawn {
        /// The program.
        program: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The main sshd_config does not include `sshd_config.d/*.conf`.
    NotIncluded {
        /// The main configuration file.
        main_config: PathBuf,
    },
    /// Something kmsbastion needs is not installed.
    NotInstalled {
        /// What is missing.
        what: String,
        /// Where it was looked for.
        looked_in: Vec<PathBuf>,
    },
    /// The kmsbastion configuration cannot be used.
    Config(String),
    /// `nsswitch.conf` has a shape `enable` will not guess about.
    Nsswitch(String),
    /// `sshd -t` rejects the configuration as it is now, before any change.
    SshdAlreadyBroken(String),
    /// pam-auth-update did not wire the profile.
    PamAuthUpdate(String),
    /// The changes were made but sshd's effective configuration is not what it must be;
    /// everything was rolled back.
    Verification(Vec<String>),
    /// The state file is unreadable.
    State {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Files `enable` changed were edited since, and `disable` knows no way to take out only
    /// kmsbastion's part of them; it will not overwrite those edits.
    Drift(Vec<PathBuf>),
    /// Rolling back after an error failed too: the listed files need a manual look.
    RollbackFailed {
        /// The error that caused the rollback.
        cause: Box<EnableError>,
        /// Files that could not be restored, with the reason.
        failures: Vec<String>,
    },
}

impl fmt::Display for EnableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnableError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            EnableError::Spawn { program, source } => {
                write!(f, "cannot run {}: {source}", program.display())
            }
            EnableError::NotIncluded { main_config } => write!(
                f,
                "{} does not include sshd_config.d/*.conf (before any Match block), so a drop-in \
                 would be ignored; kmsbastion does not edit the main sshd_config: add \
                 `Include /etc/ssh/sshd_config.d/*.conf` at its top and run enable again",
                main_config.display()
            ),
            EnableError::NotInstalled { what, looked_in } => write!(
                f,
                "{what} is not installed (looked in {}); install the kmsbastion package first",
                looked_in
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            EnableError::Config(m) => write!(f, "{m}"),
            EnableError::Nsswitch(m) => write!(f, "{NSSWITCH_PATH}: {m}"),
            EnableError::SshdAlreadyBroken(out) => write!(
                f,
                "sshd -t rejects the current configuration before any change; fix it first:\n{out}"
            ),
            EnableError::PamAuthUpdate(m) => write!(f, "pam-auth-update: {m}; nothing was changed"),
            EnableError::Verification(problems) => {
                write!(
                    f,
                    "sshd's effective configuration is not what kmsbastion needs, so every change \
                     was rolled back:"
                )?;
                for p in problems {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
            EnableError::State { path, message } => write!(
                f,
                "{}: {message}; it records what enable changed, so restore it from a backup \
                 or revert the changes by hand",
                path.display()
            ),
            EnableError::Drift(paths) => {
                write!(
                    f,
                    "these files changed after `kmsbastion enable`, and disable would overwrite \
                     those edits; nothing was changed:"
                )?;
                for p in paths {
                    write!(f, "\n  - {}", p.display())?;
                }
                write!(
                    f,
                    "\nundo the later edits (or copy them aside), then run disable again; the \
                     originals are in {STATE_PATH}"
                )
            }
            EnableError::RollbackFailed { cause, failures } => {
                write!(
                    f,
                    "{cause}\nrolling back failed too; check these files by hand:"
                )?;
                for p in failures {
                    write!(f, "\n  - {p}")?;
                }
                write!(f, "\ntheir originals are in {STATE_PATH}")
            }
        }
    }
}

impl std::error::Error for EnableError {}

/// What a command changed (or, in a dry run, would change).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// `enable` or `disable`.
    pub action: &'static str,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Files created, modified or removed.
    pub changes: Vec<Change>,
    /// Programs run (or that would run) to change the system.
    pub commands: Vec<String>,
    /// Verifications that passed.
    pub checks: Vec<String>,
    /// Anything else worth knowing.
    pub notes: Vec<String>,
}

/// One file's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Target path.
    pub path: PathBuf,
    /// `created`, `modified` or `removed`.
    pub kind: ChangeKind,
    /// Unified diff of the change (text files; binary content is shown lossily).
    pub diff: String,
}

/// How a file changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// It did not exist before.
    Created,
    /// Its contents, mode or owner changed.
    Modified,
    /// It no longer exists.
    Removed,
}

impl fmt::Display for ChangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChangeKind::Created => "created",
            ChangeKind::Modified => "modified",
            ChangeKind::Removed => "removed",
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = |c: &Change| match (self.dry_run, c.kind) {
            (false, k) => k.to_string(),
            (true, ChangeKind::Created) => "would create".into(),
            (true, ChangeKind::Modified) => "would modify".into(),
            (true, ChangeKind::Removed) => "would remove".into(),
        };
        if self.changes.is_empty() && self.commands.is_empty() {
            writeln!(f, "kmsbastion {}: nothing to change", self.action)?;
        } else if self.dry_run {
            writeln!(
                f,
                "kmsbastion {} --dry-run: nothing was changed; it would:",
                self.action
            )?;
        } else {
            writeln!(f, "kmsbastion {}:", self.action)?;
        }
        for c in &self.changes {
            writeln!(f, "  {:<13} {}", verb(c), c.path.display())?;
        }
        for c in &self.commands {
            writeln!(
                f,
                "  {:<13} {c}",
                if self.dry_run { "would run" } else { "ran" }
            )?;
        }
        for c in &self.checks {
            writeln!(f, "  {:<13} {c}", "verified")?;
        }
        for n in &self.notes {
            writeln!(f, "  {:<13} {n}", "note")?;
        }
        if self.dry_run {
            for c in &self.changes {
                if !c.diff.is_empty() {
                    write!(f, "\n{}", c.diff)?;
                }
            }
        }
        Ok(())
    }
}

/// Wires sshd, PAM and NSS to kmsbastion and verifies the result (see the module docs).
pub fn enable(opts: &EnableOptions) -> Result<Report, EnableError> {
    enable_with(
        opts,
        &ChrootPrograms {
            root: opts.root.clone(),
        },
    )
}

/// Restores every file `enable` touched, byte for byte, and removes what it created.
pub fn disable(opts: &EnableOptions) -> Result<Report, EnableError> {
    disable_with(
        opts,
        &ChrootPrograms {
            root: opts.root.clone(),
        },
    )
}

/// The output of a program run on the target system.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ran {
    /// Exit status 0.
    pub success: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Running the target system's programs (the seam unit tests replace).
pub trait Programs {
    /// Runs `program` (a path on the target system) with `args` inside the target root.
    fn run(&self, program: &Path, args: &[String]) -> io::Result<Ran>;
}

/// Runs programs directly when the root is `/`, under `chroot ROOT` otherwise, so that
/// sshd's absolute `Include` paths and pam-auth-update's paths mean the target's files.
struct ChrootPrograms {
    root: PathBuf,
}

impl Programs for ChrootPrograms {
    fn run(&self, program: &Path, args: &[String]) -> io::Result<Ran> {
        let mut cmd = if self.root == Path::new("/") {
            Command::new(program)
        } else {
            let mut c = Command::new("chroot");
            c.arg(&self.root).arg(program);
            c
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()?;
        Ok(Ran {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

/// Paths of the target system resolved under the root.
struct Target<'a> {
    root: &'a Path,
}

impl Target<'_> {
    fn path(&self, target: &str) -> PathBuf {
        under_root(self.root, Path::new(target))
    }

    fn read(&self, target: &str) -> Result<Option<FileImage>, EnableError> {
        read_image(&self.path(target)).map_err(|source| EnableError::Io {
            path: PathBuf::from(target),
            source,
        })
    }

    fn read_text(&self, target: &str) -> Result<Option<String>, EnableError> {
        Ok(self
            .read(target)?
            .map(|i| String::from_utf8_lossy(&i.bytes).into_owned()))
    }

    fn exists(&self, target: &str) -> bool {
        self.path(target).exists()
    }

    fn load_state(&self) -> Result<Option<State>, EnableError> {
        State::load(&self.path(STATE_PATH)).map_err(|message| EnableError::State {
            path: PathBuf::from(STATE_PATH),
            message,
        })
    }
}

/// One planned file change: the new image (`None`: remove).
#[derive(Debug, Clone)]
struct Planned {
    path: String,
    before: Option<FileImage>,
    after: Option<FileImage>,
}

impl Planned {
    fn change(&self) -> Change {
        let text = |i: &Option<FileImage>| {
            i.as_ref()
                .map(|i| String::from_utf8_lossy(&i.bytes).into_owned())
        };
        let (old, new) = (text(&self.before), text(&self.after));
        let mut diff = diff::unified(&self.path, old.as_deref(), &self.path, new.as_deref());
        if let (Some(b), Some(a)) = (&self.before, &self.after) {
            if (b.mode, b.uid, b.gid) != (a.mode, a.uid, a.gid) {
                diff.push_str(&format!(
                    "mode/owner of {}: {:o} {}:{} -> {:o} {}:{}\n",
                    self.path, b.mode, b.uid, b.gid, a.mode, a.uid, a.gid
                ));
            }
        }
        let kind = match (&self.before, &self.after) {
            (None, _) => ChangeKind::Created,
            (Some(_), None) => ChangeKind::Removed,
            (Some(_), Some(_)) => ChangeKind::Modified,
        };
        Change {
            path: PathBuf::from(&self.path),
            kind,
            diff,
        }
    }
}

/// The file images of the target before this run changed anything, plus the directories
/// whose new files count as created by this run (pam-auth-update writes into them).
#[derive(Debug, Default)]
struct Snapshot {
    files: BTreeMap<String, Option<FileImage>>,
    watched_dirs: Vec<String>,
    created_dirs: Vec<String>,
}

impl Snapshot {
    fn take(&mut self, target: &Target<'_>, path: &str) -> Result<(), EnableError> {
        if !self.files.contains_key(path) {
            let image = target.read(path)?;
            self.files.insert(path.to_string(), image);
        }
        Ok(())
    }

    fn watch_dir(&mut self, target: &Target<'_>, dir: &str) -> Result<(), EnableError> {
        for file in self.files_in(target, dir)? {
            self.take(target, &file)?;
        }
        self.watched_dirs.push(dir.to_string());
        Ok(())
    }

    fn files_in(&self, target: &Target<'_>, dir: &str) -> Result<Vec<String>, EnableError> {
        let found = files::list_files(&target.path(dir)).map_err(|source| EnableError::Io {
            path: PathBuf::from(dir),
            source,
        })?;
        Ok(found
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            // debconf's password database is never written by pam-auth-update, and its
            // contents must not be copied into the state file.
            .filter(|n| !n.starts_with(DEBCONF_PASSWORDS))
            .map(|n| format!("{}/{n}", dir.trim_end_matches('/')))
            .collect())
    }

    /// Files whose image now differs from the snapshot, with their original image.
    fn changed(
        &self,
        target: &Target<'_>,
    ) -> Result<Vec<(String, Option<FileImage>)>, EnableError> {
        let mut all = self.files.clone();
        for dir in &self.watched_dirs {
            for file in self.files_in(target, dir)? {
                all.entry(file).or_insert(None);
            }
        }
        let mut out = Vec::new();
        for (path, original) in all {
            if target.read(&path)? != original {
                out.push((path, original));
            }
        }
        Ok(out)
    }

    /// Creates `dir` and its missing parents, remembering which it created.
    fn ensure_dir(&mut self, target: &Target<'_>, dir: &str) -> Result<(), EnableError> {
        let mut missing = Vec::new();
        let mut current = Some(Path::new(dir));
        while let Some(d) = current {
            if d == Path::new("/") || target.path(&d.to_string_lossy()).exists() {
                break;
            }
            missing.push(d.to_string_lossy().into_owned());
            current = d.parent();
        }
        for d in missing.into_iter().rev() {
            std::fs::create_dir(target.path(&d)).map_err(|source| EnableError::Io {
                path: PathBuf::from(&d),
                source,
            })?;
            self.created_dirs.push(d);
        }
        Ok(())
    }

    /// Puts every changed file back and removes the directories this run created.
    fn roll_back(&self, target: &Target<'_>, cause: EnableError) -> EnableError {
        let mut failures = Vec::new();
        match self.changed(target) {
            Ok(changed) => {
                for (path, original) in changed {
                    if let Err(e) = files::restore(&target.path(&path), original.as_ref()) {
                        failures.push(format!("{path}: {e}"));
                    }
                }
            }
            Err(e) => failures.push(e.to_string()),
        }
        for dir in self.created_dirs.iter().rev() {
            if let Err(e) = std::fs::remove_dir(target.path(dir)) {
                failures.push(format!("{dir}: {e}"));
            }
        }
        if failures.is_empty() {
            cause
        } else {
            EnableError::RollbackFailed {
                cause: Box::new(cause),
                failures,
            }
        }
    }
}

/// Everything `enable` checked and decided before touching a file.
struct Preflight {
    bastion_login: String,
    local_users: Vec<String>,
    local_dumps: Vec<String>,
    expected: Vec<sshd::Directive>,
    max_startups: sshd::MaxStartupsChoice,
    debian: bool,
    pam_lines: Vec<pam::PamLine>,
}

fn enable_with(opts: &EnableOptions, programs: &dyn Programs) -> Result<Report, EnableError> {
    let target = Target { root: &opts.root };
    let previous = target.load_state()?;
    let pre = preflight(opts, &target, programs)?;
    let (owner_uid, owner_gid) = state::current_owner(&opts.root);
    let new_file = |text: &str| FileImage {
        bytes: text.as_bytes().to_vec(),
        mode: 0o644,
        uid: owner_uid,
        gid: owner_gid,
    };

    // Plan the file edits.
    let mut plan: Vec<Planned> = Vec::new();
    let mut plan_file = |path: &str, after: FileImage| -> Result<(), EnableError> {
        let before = target.read(path)?;
        if before.as_ref().map(|b| &b.bytes) != Some(&after.bytes) {
            let after = match &before {
                Some(b) => FileImage {
                    mode: b.mode,
                    uid: b.uid,
                    gid: b.gid,
                    ..after
                },
                None => after,
            };
            plan.push(Planned {
                path: path.to_string(),
                before,
                after: Some(after),
            });
        }
        Ok(())
    };
    let ours = pre.max_startups == sshd::MaxStartupsChoice::Ours;
    plan_file(sshd::DROP_IN_PATH, new_file(&sshd::drop_in(ours)))?;
    let nss_text = target
        .read_text(NSSWITCH_PATH)?
        .ok_or_else(|| EnableError::NotInstalled {
            what: NSSWITCH_PATH.to_string(),
            looked_in: vec![target.path(NSSWITCH_PATH)],
        })?;
    let nss_new =
        nsswitch::add_service(&nss_text).map_err(|e| EnableError::Nsswitch(e.to_string()))?;
    plan_file(NSSWITCH_PATH, new_file(&nss_new))?;
    let mut commands = Vec::new();
    if pre.debian {
        plan_file(pam::PROFILE_PATH, new_file(&pam::profile(&pre.pam_lines)))?;
        let wired = target
            .read_text(pam::COMMON_ACCOUNT)?
            .is_some_and(|t| pam::mentions_module(&t));
        if !wired {
            commands.push(format!(
                "{} --package --enable {}",
                pam::PAM_AUTH_UPDATE,
                pam::PROFILE_NAME
            ));
        }
    } else {
        let text =
            target
                .read_text(pam::SSHD_SERVICE)?
                .ok_or_else(|| EnableError::NotInstalled {
                    what: format!("sshd's PAM service file {}", pam::SSHD_SERVICE),
                    looked_in: vec![target.path(pam::SSHD_SERVICE)],
                })?;
        plan_file(
            pam::SSHD_SERVICE,
            new_file(&pam::wire_service(&text, &pre.pam_lines)),
        )?;
    }

    let mut report = Report {
        action: "enable",
        dry_run: opts.dry_run,
        changes: plan.iter().map(Planned::change).collect(),
        commands: commands.clone(),
        notes: vec![max_startups_note(&pre.max_startups, opts.dry_run)],
        ..Report::default()
    };
    if opts.dry_run {
        report.notes.push(format!(
            "afterwards sshd -t and sshd -T for {} and for {} would be checked",
            pre.bastion_login,
            pre.local_users.join(", ")
        ));
        report.notes.push(format!(
            "and `{KMSBASTION_BIN} index` would rebuild the configuration's lookup index"
        ));
        return Ok(report);
    }
    if plan.is_empty() && commands.is_empty() {
        report.checks = verify(opts, programs, &pre)?;
        report.notes.push(rebuild_index(opts, &target, programs));
        if previous.is_none() {
            report.notes.push(format!(
                "everything was already in place without a record in {STATE_PATH}, so disable \
                 will have nothing to restore"
            ));
        }
        return Ok(report);
    }

    // Snapshot what this run may touch, record it, apply, verify; roll back on any error.
    let mut snap = Snapshot::default();
    for p in &plan {
        snap.take(&target, &p.path)?;
    }
    snap.take(&target, STATE_PATH)?;
    if pre.debian && !commands.is_empty() {
        for dir in pam::PAM_AUTH_UPDATE_DIRS {
            snap.watch_dir(&target, dir)?;
        }
    }
    let applied = apply(&target, programs, &pre, &plan, &mut snap, previous.as_ref());
    let checks = match applied.and_then(|()| verify(opts, programs, &pre)) {
        Ok(checks) => checks,
        Err(e) => return Err(snap.roll_back(&target, e)),
    };
    let recorded = record(&target, &snap, previous);
    if let Err(e) = recorded {
        return Err(snap.roll_back(&target, e));
    }
    // What actually changed (pam-auth-update may have rewritten more than the plan).
    report.changes = snap
        .changed(&target)?
        .into_iter()
        .filter(|(path, _)| path != STATE_PATH)
        .map(|(path, before)| {
            let after = target.read(&path).ok().flatten();
            Planned {
                path,
                before,
                after,
            }
            .change()
        })
        .collect();
    report.checks = checks;
    report.notes.push(format!(
        "originals recorded in {STATE_PATH}; `kmsbastion disable` restores them"
    ));
    report.notes.push(rebuild_index(opts, &target, programs));
    Ok(report)
}

/// Runs `kmsbastion index --config CONFIG` on the target, after a successful enable, and says
/// how it went. The index only spares sshd's helpers the parsing of a large inventory (they
/// fall back to the file while it is missing or stale), so a failure is a note, not a reason
/// to roll back.
fn rebuild_index(opts: &EnableOptions, target: &Target<'_>, programs: &dyn Programs) -> String {
    if !target.exists(KMSBASTION_BIN) {
        return format!(
            "lookup index not rebuilt: {KMSBASTION_BIN} is not installed; logins parse the \
             configuration until it is"
        );
    }
    let args = [
        "index".to_string(),
        "--config".to_string(),
        opts.config.to_string_lossy().into_owned(),
    ];
    let failed = |why: String| {
        format!(
            "lookup index not rebuilt ({why}); logins work without it: run `kmsbastion index` \
             as root later"
        )
    };
    match programs.run(Path::new(KMSBASTION_BIN), &args) {
        Ok(ran) if ran.success => {
            let said = ran.stdout.trim();
            format!(
                "lookup index rebuilt by `{KMSBASTION_BIN} index`: {}",
                said.strip_prefix("index: ").unwrap_or(said)
            )
        }
        Ok(ran) => failed(ran.stderr.trim().to_string()),
        Err(e) => failed(format!("cannot run {KMSBASTION_BIN}: {e}")),
    }
}

fn preflight(
    opts: &EnableOptions,
    target: &Target<'_>,
    programs: &dyn Programs,
) -> Result<Preflight, EnableError> {
    let main = target
        .read_text(sshd::MAIN_CONFIG)?
        .ok_or_else(|| EnableError::NotInstalled {
            what: format!("OpenSSH server configuration {}", sshd::MAIN_CONFIG),
            looked_in: vec![target.path(sshd::MAIN_CONFIG)],
        })?;
    if !sshd::includes_drop_in(&main) {
        return Err(EnableError::NotIncluded {
            main_config: PathBuf::from(sshd::MAIN_CONFIG),
        });
    }
    let drop_in = sshd::parse(sshd::DROP_IN);
    for program in sshd::programs(&drop_in) {
        if !target.exists(&program) {
            return Err(EnableError::NotInstalled {
                what: program.clone(),
                looked_in: vec![target.path(&program)],
            });
        }
    }
    require_one_of(target, &pam::SECURITY_DIRS, pam::MODULE, "the PAM module")?;
    require_one_of(target, &LIBRARY_DIRS, NSS_LIBRARY, "the NSS module")?;
    if !target.exists(&opts.sshd.to_string_lossy()) {
        return Err(EnableError::NotInstalled {
            what: format!("sshd ({})", opts.sshd.display()),
            looked_in: vec![target.path(&opts.sshd.to_string_lossy())],
        });
    }
    let bastion_login = bastion_login(opts, target)?;
    let local_users = local_users(target)?;

    let checked = run(programs, &opts.sshd, &["-t".to_string()])?;
    if !checked.success {
        return Err(EnableError::SshdAlreadyBroken(checked.stderr));
    }
    let mut local_dumps = Vec::new();
    for user in &local_users {
        local_dumps.push(dump(programs, &opts.sshd, user)?);
    }
    let max_startups = max_startups_choice(opts, target, programs)?;
    let debian = target.exists(pam::PAM_AUTH_UPDATE);
    let pam_lines = pam::snippet_lines(pam::SNIPPET);
    Ok(Preflight {
        bastion_login,
        local_users,
        local_dumps,
        expected: drop_in.conditional,
        max_startups,
        debian,
        pam_lines,
    })
}

fn require_one_of(
    target: &Target<'_>,
    dirs: &[&str],
    file: &str,
    what: &str,
) -> Result<(), EnableError> {
    if dirs.iter().any(|d| target.exists(&format!("{d}/{file}"))) {
        return Ok(());
    }
    Err(EnableError::NotInstalled {
        what: format!("{what} ({file})"),
        looked_in: dirs.iter().map(|d| PathBuf::from(*d)).collect(),
    })
}

/// A login that NSS resolves into the bastion group: the first engineer with the first
/// host account (`engineer@account@host`), or the plain engineer name without hosts.
fn bastion_login(opts: &EnableOptions, target: &Target<'_>) -> Result<String, EnableError> {
    let config_path = opts.config.to_string_lossy().into_owned();
    let text = target.read_text(&config_path)?.ok_or_else(|| {
        EnableError::Config(format!(
            "{config_path} does not exist; write the kmsbastion configuration first (see \
             kmsbastion.toml(5)), then run enable"
        ))
    })?;
    let local = LocalDb::read(
        &target.path(LOCAL_PASSWD_PATH),
        &target.path(LOCAL_GROUP_PATH),
    )
    .map_err(|source| EnableError::Io {
        path: PathBuf::from(LOCAL_PASSWD_PATH),
        source,
    })?;
    let config = Config::parse_checked(&text, &opts.config, &local)
        .map_err(|e| EnableError::Config(format!("{e}\nfix the configuration, then run enable")))?;
    // The shipped drop-in matches the default bastion group by name.
    let matched = sshd::parse(sshd::DROP_IN).matches;
    let wanted = format!("group {}", config.bastion.group);
    if !matched.iter().any(|m| m.eq_ignore_ascii_case(&wanted)) {
        return Err(EnableError::Config(format!(
            "{config_path}: [bastion] group is \"{}\", but the sshd drop-in applies to `Match {}`; \
             use group = \"{}\" so sshd applies the bastion settings to engineers",
            config.bastion.group,
            matched.first().map(String::as_str).unwrap_or("?"),
            crate::config::DEFAULT_BASTION_GROUP
        )));
    }
    let engineer = config.engineers.first().ok_or_else(|| {
        EnableError::Config(format!(
            "{config_path} defines no engineer; enable proves sshd's settings for a real \
             bastion login, so add an [[engineer]] first"
        ))
    })?;
    let account = config.hosts.iter().find_map(|h| {
        h.accounts
            .first()
            .map(|a| format!("{}@{}@{}", engineer.name, a.name, h.name))
    });
    Ok(account.unwrap_or_else(|| engineer.name.clone()))
}

/// Local users whose effective sshd settings must not change: root, and the first regular
/// user (uid 1000..60000) if there is one.
fn local_users(target: &Target<'_>) -> Result<Vec<String>, EnableError> {
    let passwd = target.read_text(LOCAL_PASSWD_PATH)?.unwrap_or_default();
    let mut users = vec!["root".to_string()];
    let regular = passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let uid: u32 = fields.nth(1)?.parse().ok()?;
        ((1000..60000).contains(&uid) && name != "root").then(|| name.to_string())
    });
    users.extend(regular);
    Ok(users)
}

fn run(programs: &dyn Programs, program: &Path, args: &[String]) -> Result<Ran, EnableError> {
    programs
        .run(program, args)
        .map_err(|source| EnableError::Spawn {
            program: program.to_path_buf(),
            source,
        })
}

/// `sshd -T` for a connection by `user`.
fn dump(programs: &dyn Programs, sshd_binary: &Path, user: &str) -> Result<String, EnableError> {
    Ok(dump_traced(programs, sshd_binary, user, false)?.stdout)
}

/// `sshd -T` for a connection by `user`; with `trace`, also `-ddd`, whose standard error
/// names every directive sshd applied with its file and line.
fn dump_traced(
    programs: &dyn Programs,
    sshd_binary: &Path,
    user: &str,
    trace: bool,
) -> Result<Ran, EnableError> {
    let spec = format!("user={user},host={CHECK_HOST},addr={CHECK_ADDR}");
    let mut args = vec!["-T".to_string(), "-C".to_string(), spec];
    if trace {
        args.push("-ddd".to_string());
    }
    let ran = run(programs, sshd_binary, &args)?;
    if !ran.success {
        return Err(EnableError::Verification(vec![format!(
            "sshd -T for {user} failed: {}",
            ran.stderr.trim()
        )]));
    }
    Ok(ran)
}

/// Whether the drop-in may set `MaxStartups` (see [`sshd::choose_max_startups`]), from sshd's
/// own account of the files it reads (`sshd -T -ddd`) and its effective value, before any
/// change. Reading sshd's trace rather than the files themselves means `Include` globs,
/// nesting and order are exactly sshd's; the first-or-last-wins rule, which changed in
/// OpenSSH 10.1, does not matter, because any line but ours counts as the administrator's.
fn max_startups_choice(
    opts: &EnableOptions,
    target: &Target<'_>,
    programs: &dyn Programs,
) -> Result<sshd::MaxStartupsChoice, EnableError> {
    let traced = dump_traced(programs, &opts.sshd, "root", true)?;
    let effective = sshd::parse_dump(&traced.stdout);
    let sources = sshd::setting_sources(&traced.stderr, "maxstartups");
    let ours_installed = target.read_text(sshd::DROP_IN_PATH)?.is_some_and(|t| {
        sshd::parse(&t)
            .global
            .iter()
            .any(|d| d.keyword == "maxstartups")
    });
    Ok(sshd::choose_max_startups(
        opts.keep_max_startups,
        sshd::dump_value(&effective, "maxstartups"),
        ours_installed,
        &sources,
    ))
}

/// The report's line about `MaxStartups`.
fn max_startups_note(choice: &sshd::MaxStartupsChoice, dry_run: bool) -> String {
    match choice {
        sshd::MaxStartupsChoice::Ours => format!(
            "{} MaxStartups {} in the drop-in, for bursts of logins (no other file sets \
             MaxStartups; --keep-max-startups leaves it out)",
            if dry_run { "would set" } else { "sets" },
            sshd::MAX_STARTUPS
        ),
        sshd::MaxStartupsChoice::Theirs { value, reason, .. } => format!(
            "keeping your MaxStartups {value} ({reason}); the drop-in leaves its {} out",
            sshd::MAX_STARTUPS
        ),
    }
}

/// Checks `MaxStartups` in the bastion login's `sshd -T` after the change.
fn verify_max_startups(
    choice: &sshd::MaxStartupsChoice,
    dump: &[sshd::Directive],
) -> Result<String, String> {
    let shown = sshd::dump_value(dump, "maxstartups").unwrap_or("(none)");
    match choice {
        sshd::MaxStartupsChoice::Ours if shown == sshd::MAX_STARTUPS => {
            Ok(format!("sshd -T shows maxstartups {shown}, the drop-in's"))
        }
        sshd::MaxStartupsChoice::Ours => Err(format!(
            "sshd -T shows maxstartups {shown}, not the drop-in's {}: a MaxStartups sshd reads \
             after the drop-in wins (OpenSSH before 10.1 keeps the last one); remove it, or run \
             enable --keep-max-startups to keep it",
            sshd::MAX_STARTUPS
        )),
        sshd::MaxStartupsChoice::Theirs { expected, .. }
            if expected.is_empty() || expected.iter().any(|v| v == shown) =>
        {
            Ok(format!("sshd -T shows maxstartups {shown}, yours, kept"))
        }
        sshd::MaxStartupsChoice::Theirs { value, .. } => Err(format!(
            "sshd -T shows maxstartups {shown} instead of your {value}"
        )),
    }
}

fn apply(
    target: &Target<'_>,
    programs: &dyn Programs,
    pre: &Preflight,
    plan: &[Planned],
    snap: &mut Snapshot,
    previous: Option<&State>,
) -> Result<(), EnableError> {
    // Record the originals first: if this process dies halfway, disable can still restore.
    let state_dir = Path::new(STATE_PATH)
        .parent()
        .map_or_else(|| "/".to_string(), |p| p.to_string_lossy().into_owned());
    snap.ensure_dir(target, &state_dir)?;
    let mut pending = previous.cloned().unwrap_or_default();
    for (path, original) in &snap.files {
        if path != STATE_PATH && pending.file(path).is_none() {
            pending.files.push(TouchedFile {
                path: path.clone(),
                original: original.as_ref().map(StoredImage::from_image),
                // Until the final record replaces this one, "as enable left it" is "as it
                // was": after a crash, disable restores what it can and names the rest.
                after_sha256: original.as_ref().map(FileImage::sha256),
            });
        }
    }
    pending
        .created_dirs
        .extend(snap.created_dirs.iter().cloned());
    save_state(target, &pending)?;

    for p in plan {
        if let Some(parent) = Path::new(&p.path).parent() {
            snap.ensure_dir(target, &parent.to_string_lossy())?;
        }
        let path = target.path(&p.path);
        files::restore(&path, p.after.as_ref()).map_err(|source| EnableError::Io {
            path: PathBuf::from(&p.path),
            source,
        })?;
    }
    if pre.debian {
        let wired = |t: &Target<'_>| -> Result<bool, EnableError> {
            Ok(t.read_text(pam::COMMON_ACCOUNT)?
                .is_some_and(|x| pam::mentions_module(&x)))
        };
        if !wired(target)? {
            let args = [
                "--package".to_string(),
                "--enable".to_string(),
                pam::PROFILE_NAME.to_string(),
            ];
            let ran = run(programs, Path::new(pam::PAM_AUTH_UPDATE), &args)?;
            if !ran.success {
                return Err(EnableError::PamAuthUpdate(format!(
                    "it failed: {}",
                    ran.stderr.trim()
                )));
            }
            if !wired(target)? {
                return Err(EnableError::PamAuthUpdate(format!(
                    "{} still does not call {} (pam-auth-update leaves locally modified \
                     common-* files alone: {}); merge the profile {} by hand or run \
                     `pam-auth-update --force` after reviewing your changes",
                    pam::COMMON_ACCOUNT,
                    pam::MODULE,
                    ran.stderr.trim(),
                    pam::PROFILE_PATH
                )));
            }
        }
    }
    Ok(())
}

/// `sshd -t`, the bastion login's settings, and the local users' unchanged settings.
fn verify(
    opts: &EnableOptions,
    programs: &dyn Programs,
    pre: &Preflight,
) -> Result<Vec<String>, EnableError> {
    let mut problems = Vec::new();
    let mut checks = Vec::new();
    let checked = run(programs, &opts.sshd, &["-t".to_string()])?;
    if checked.success {
        checks.push("sshd -t accepts the configuration".to_string());
    } else {
        problems.push(format!(
            "sshd -t rejects the configuration: {}",
            checked.stderr.trim()
        ));
    }
    let bastion = sshd::parse_dump(&dump(programs, &opts.sshd, &pre.bastion_login)?);
    let missing = sshd::missing_settings(&bastion, &pre.expected);
    if missing.is_empty() {
        checks.push(format!(
            "sshd -T for bastion login {} has all {} settings of the drop-in",
            pre.bastion_login,
            pre.expected.len()
        ));
    } else {
        problems.push(format!(
            "sshd -T for bastion login {} lacks: {} (an earlier drop-in or sshd_config line sets \
             them first, or NSS does not put the login in the bastion group)",
            pre.bastion_login,
            missing
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    match verify_max_startups(&pre.max_startups, &bastion) {
        Ok(check) => checks.push(check),
        Err(problem) => problems.push(problem),
    }
    // MaxStartups is the one global setting enable manages, checked above; everything else
    // must be exactly as before for local users.
    for (user, before) in pre.local_users.iter().zip(&pre.local_dumps) {
        let after = dump(programs, &opts.sshd, user)?;
        let (before_rest, after_rest) = (
            sshd::dump_without(before, "maxstartups"),
            sshd::dump_without(&after, "maxstartups"),
        );
        if &after == before {
            checks.push(format!(
                "sshd -T for local user {user} is identical to before"
            ));
        } else if before_rest == after_rest {
            checks.push(format!(
                "sshd -T for local user {user} is identical to before apart from maxstartups"
            ));
        } else {
            let d = diff::unified("before", Some(&before_rest), "after", Some(&after_rest));
            problems.push(format!("sshd -T for local user {user} changed:\n{d}"));
        }
    }
    if problems.is_empty() {
        Ok(checks)
    } else {
        Err(EnableError::Verification(problems))
    }
}

/// Writes the final record: originals of what this run changed (earlier runs' originals
/// win), and the images as enable left them.
fn record(
    target: &Target<'_>,
    snap: &Snapshot,
    previous: Option<State>,
) -> Result<(), EnableError> {
    let mut state = previous.unwrap_or_default();
    for (path, original) in snap.changed(target)? {
        if path == STATE_PATH || state.file(&path).is_some() {
            continue;
        }
        state.files.push(TouchedFile {
            path,
            original: original.as_ref().map(StoredImage::from_image),
            after_sha256: None,
        });
    }
    for f in &mut state.files {
        f.after_sha256 = target.read(&f.path)?.map(|i| i.sha256());
    }
    state.created_dirs.extend(snap.created_dirs.iter().cloned());
    save_state(target, &state)
}

fn save_state(target: &Target<'_>, state: &State) -> Result<(), EnableError> {
    state
        .save(&target.path(STATE_PATH))
        .map_err(|message| EnableError::State {
            path: PathBuf::from(STATE_PATH),
            message,
        })
}

/// The files pam-auth-update maintains as one set: its generated stacks, its saved copies and
/// the debconf database. They are restored byte for byte together or not at all (restoring
/// only some would make pam-auth-update see "local modifications" and refuse to work).
fn in_pam_auth_update_set(path: &str) -> bool {
    path.starts_with("/etc/pam.d/common-")
        || path.starts_with("/var/lib/pam/")
        || path.starts_with("/var/cache/debconf/")
}

fn disable_with(opts: &EnableOptions, programs: &dyn Programs) -> Result<Report, EnableError> {
    let target = Target { root: &opts.root };
    let mut report = Report {
        action: "disable",
        dry_run: opts.dry_run,
        ..Report::default()
    };
    let Some(state) = target.load_state()? else {
        report
            .notes
            .push(format!("kmsbastion is not enabled here (no {STATE_PATH})"));
        return Ok(report);
    };

    // Files untouched since enable go back byte for byte. A file edited since (by an
    // administrator, or pam-auth-update/debconf run for another package) keeps those edits:
    // only kmsbastion's own lines come out of it.
    let mut current = BTreeMap::new();
    let mut drifted = Vec::new();
    for f in &state.files {
        let image = target.read(&f.path)?;
        if image.as_ref().map(FileImage::sha256) != f.after_sha256 {
            drifted.push(f.path.clone());
        }
        current.insert(f.path.clone(), image);
    }
    let pam_set_drifted = drifted.iter().any(|p| in_pam_auth_update_set(p));
    let mut plan = Vec::new();
    let mut unknown_drift = Vec::new();
    for f in &state.files {
        let now = current.get(&f.path).cloned().flatten();
        let original = match &f.original {
            Some(stored) => Some(stored.to_image().map_err(|message| EnableError::State {
                path: PathBuf::from(STATE_PATH),
                message: format!("entry for {}: {message}", f.path),
            })?),
            None => None,
        };
        let is_drifted = drifted.contains(&f.path);
        let after = if in_pam_auth_update_set(&f.path) && pam_set_drifted {
            // pam-auth-update --remove below rewrites these consistently.
            continue;
        } else if !is_drifted {
            original
        } else if f.path == NSSWITCH_PATH || f.path == pam::SSHD_SERVICE {
            let Some(image) = &now else { continue };
            let text = String::from_utf8_lossy(&image.bytes);
            let cleaned = if f.path == NSSWITCH_PATH {
                nsswitch::remove_service(&text)
            } else {
                pam::unwire_service(&text)
            };
            report.notes.push(format!(
                "{} changed after enable; removed kmsbastion's lines and kept the later edits",
                f.path
            ));
            Some(FileImage {
                bytes: cleaned.into_bytes(),
                ..image.clone()
            })
        } else if f.path == sshd::DROP_IN_PATH || f.path == pam::PROFILE_PATH {
            report.notes.push(format!(
                "{} changed after enable; it is kmsbastion's own file, so it is removed all the same",
                f.path
            ));
            original
        } else {
            unknown_drift.push(PathBuf::from(&f.path));
            continue;
        };
        if now != after {
            plan.push(Planned {
                path: f.path.clone(),
                before: now,
                after,
            });
        }
    }
    if !unknown_drift.is_empty() {
        return Err(EnableError::Drift(unknown_drift));
    }
    let remove_args = [
        "--package".to_string(),
        "--remove".to_string(),
        pam::PROFILE_NAME.to_string(),
    ];
    if pam_set_drifted {
        report.notes.push(
            "the PAM stacks changed after enable (another package ran pam-auth-update or \
             debconf); pam-auth-update removes the kmsbastion profile instead of restoring bytes"
                .to_string(),
        );
        report.commands.push(format!(
            "{} {}",
            pam::PAM_AUTH_UPDATE,
            remove_args.join(" ")
        ));
    }
    report.changes = plan.iter().map(Planned::change).collect();
    if opts.dry_run {
        return Ok(report);
    }

    let mut failures = Vec::new();
    for p in &plan {
        if let Err(e) = files::restore(&target.path(&p.path), p.after.as_ref()) {
            failures.push(format!("{}: {e}", p.path));
        }
    }
    if pam_set_drifted {
        let ran = run(programs, Path::new(pam::PAM_AUTH_UPDATE), &remove_args)?;
        let still = target
            .read_text(pam::COMMON_ACCOUNT)?
            .is_some_and(|t| pam::mentions_module(&t));
        if !ran.success || still {
            failures.push(format!(
                "{}: pam-auth-update --remove {} did not take {} out ({}); run it by hand, or \
                 remove the pam_kmsbastion.so lines from /etc/pam.d/common-*",
                pam::COMMON_ACCOUNT,
                pam::PROFILE_NAME,
                pam::MODULE,
                ran.stderr.trim()
            ));
        }
    }
    if !failures.is_empty() {
        return Err(EnableError::RollbackFailed {
            cause: Box::new(EnableError::State {
                path: PathBuf::from(STATE_PATH),
                message: "disable could not restore every file".to_string(),
            }),
            failures,
        });
    }
    let state_path = target.path(STATE_PATH);
    std::fs::remove_file(&state_path).map_err(|source| EnableError::Io {
        path: PathBuf::from(STATE_PATH),
        source,
    })?;
    for dir in state.created_dirs.iter().rev() {
        // Only empty directories go; anything left inside is somebody else's.
        if std::fs::remove_dir(target.path(dir)).is_err() {
            report.notes.push(format!("kept {dir}: it is not empty"));
        }
    }
    if target.exists(&opts.sshd.to_string_lossy()) {
        let checked = run(programs, &opts.sshd, &["-t".to_string()])?;
        if checked.success {
            report
                .checks
                .push("sshd -t accepts the restored configuration".to_string());
        } else {
            report.notes.push(format!(
                "sshd -t rejects the restored configuration (kmsbastion's settings are gone; \
                 the rest is as it was): {}",
                checked.stderr.trim()
            ));
        }
    }
    let exact = plan.len()
        - report
            .notes
            .iter()
            .filter(|n| n.contains("removed kmsbastion's lines"))
            .count();
    report
        .notes
        .push(format!("restored {exact} file(s) byte for byte"));
    Ok(report)
}

#[cfg(test)]
mod tests;
