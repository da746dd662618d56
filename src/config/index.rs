//! A lookup index of the *validated* configuration, so that the helpers sshd starts for every
//! login (the AuthorizedKeysCommand, the PAM module, the login shell, the broker) and the NSS
//! module in every process do not parse and validate a large inventory on each call.
//!
//! # What it is
//!
//! A compact binary file, `INDEX_DIR/<16 hex of sha256(absolute config path)>.idx`, written
//! only from a configuration that [`Config::load`] accepted (the local `/etc/passwd` and
//! `/etc/group` checks included). It holds:
//!
//! * a header: magic, format version, the identity (device, inode, size, mtime and ctime to
//!   the nanosecond) of the three inputs `Config::load` depends on — the configuration,
//!   [`LOCAL_PASSWD_PATH`] and [`LOCAL_GROUP_PATH`] — the lengths of the two parts below,
//!   and a checksum (XXH64) of the header and the directory;
//! * the directory, read whole: the `[kms]`, `[bastion]` and `[audit]` settings, sorted
//!   tables (engineer name → record, uid → engineer, host name → record, with the names) and
//!   the file order of engineers, hosts and grants (with each grant's line);
//! * the records, each with its own checksum, read one by one (`pread`) when a lookup needs
//!   them: engineers (with the numbers of the grant rules that apply to them,
//!   [`GrantRule::applies_to`], in file order), hosts, grant rules. A lookup thus reads the
//!   header, the directory (about a tenth of the file) and a few records, never the whole
//!   file; a damaged record makes exactly the lookups that need it fall back.
//!
//! # When it is used
//!
//! [`load`] / [`Config::load_scoped`] answer from the index only when the file exists, is a
//! regular file (opened without following a link) owned by root and not writable by group or
//! others, every directory above it is root-owned and not writable by group or others, the
//! version matches, the checksums verify and the recorded identities equal the current
//! `stat` of all three inputs. In every other case they silently do the full
//! [`Config::load`]: correctness never depends on the index, it only buys speed. A
//! configuration that does not load has no usable index (its identity changed since the index
//! was written), so such a load ends in the same error as before.
//!
//! # Scoped configurations
//!
//! A [`Scope`] says what the caller needs; the returned [`Config`] holds the settings and just
//! those records. Grant rules keep their numbers: rules that do not apply to the engineer are
//! present as inert placeholders (no subjects, no patterns: they apply to nobody), so
//! [`crate::grant::evaluate`], [`crate::authorized_keys::authorized_keys`],
//! [`crate::passwd`] and [`crate::grant::reachable`] give exactly what they give on the full
//! configuration, rule numbers and lines included. A scoped configuration carries no
//! [`ConfigWarning`]s (`kmsbastion check` loads the whole file).
//!
//! # Races
//!
//! File timestamps are coarse: two writes within one clock tick can leave size, mtime and
//! ctime unchanged. An index is therefore written only when every input last changed at least
//! [`SETTLE_TIME`] before it was read (then any later change shows in the ctime), and only if
//! the identities after the build equal those before it. `kmsbastion index` waits that long;
//! the PAM module leaves the rebuild to a later login.
#![forbid(unsafe_code)]

use super::*;
use crate::login::{Login, LoginString};
use sha2::{Digest as _, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::time::{Duration, UNIX_EPOCH};

/// Directory of index files (root-owned, mode 0755; below the brokers' runtime directory).
pub const INDEX_DIR: &str = "/run/kmsbastion/index";
/// Version of the file format; an index of another version is ignored.
pub const INDEX_FORMAT_VERSION: u32 = 1;
/// An input must have been unchanged this long before an index is built from it: many times
/// the kernel's timestamp tick (at most 10 ms). On a filesystem that keeps whole seconds only
/// (both nanosecond fields zero), [`COARSE_SETTLE_FACTOR`] times as long.
pub const SETTLE_TIME: Duration = Duration::from_millis(100);
/// See [`SETTLE_TIME`]: 2 s for second-granular timestamps.
pub const COARSE_SETTLE_FACTOR: u32 = 20;
/// Largest index file read.
pub const MAX_INDEX_SIZE: u64 = 64 * 1024 * 1024;

const MAGIC: &[u8; 8] = b"KMSBIDX\n";
/// magic, version, flags, 3 identities of 7 × 8 bytes, directory and records lengths.
const HEADER_PREFIX_LEN: usize = 8 + 4 + 4 + 3 * 56 + 8 + 8;
/// The prefix and the checksum of prefix and directory.
const HEADER_LEN: usize = HEADER_PREFIX_LEN + 8;
/// Section offsets at the start of the directory.
const SECTIONS: usize = 8;

/// Identity of one file as `stat(2)` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// `st_dev`
    pub dev: u64,
    /// `st_ino`
    pub ino: u64,
    /// `st_size`
    pub size: u64,
    /// `st_mtime`
    pub mtime_sec: i64,
    /// `st_mtime_nsec`
    pub mtime_nsec: i64,
    /// `st_ctime`
    pub ctime_sec: i64,
    /// `st_ctime_nsec`
    pub ctime_nsec: i64,
}

impl FileIdentity {
    /// The identity of `path` (links followed, as reading it does).
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        let m = fs::metadata(path)?;
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_sec: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime_sec: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }

    /// Nanoseconds since the epoch from which on a change of the file is certain to show in
    /// its identity, if it was last changed `settle` after its timestamps.
    fn settled_ns(&self, settle: Duration) -> i128 {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        let changed = ns(self.mtime_sec, self.mtime_nsec).max(ns(self.ctime_sec, self.ctime_nsec));
        let coarse = self.mtime_nsec == 0 && self.ctime_nsec == 0;
        let settle = if coarse {
            settle.saturating_mul(COARSE_SETTLE_FACTOR)
        } else {
            settle
        };
        changed + settle.as_nanos() as i128
    }
}

/// The identities of everything [`Config::load`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    /// The configuration file.
    pub config: FileIdentity,
    /// [`LOCAL_PASSWD_PATH`].
    pub passwd: FileIdentity,
    /// [`LOCAL_GROUP_PATH`].
    pub group: FileIdentity,
}

impl Inputs {
    /// The current identities of `config_path` and the local account files.
    pub fn current(config_path: &Path) -> io::Result<Inputs> {
        Ok(Inputs {
            config: FileIdentity::of(config_path)?,
            passwd: FileIdentity::of(Path::new(LOCAL_PASSWD_PATH))?,
            group: FileIdentity::of(Path::new(LOCAL_GROUP_PATH))?,
        })
    }
}

/// The inputs' identities and when they were taken (just before the files were read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The identities.
    pub inputs: Inputs,
    taken_ns: i128,
}

impl Snapshot {
    /// Takes the identities now.
    pub fn take(config_path: &Path) -> io::Result<Snapshot> {
        let taken_ns = now_ns();
        Ok(Snapshot {
            inputs: Inputs::current(config_path)?,
            taken_ns,
        })
    }

    /// Whether every input last changed at least [`SETTLE_TIME`] before the snapshot, so that
    /// a later change cannot keep the same identity.
    pub fn settled(&self) -> bool {
        self.wait_needed(SETTLE_TIME).is_zero()
    }

    /// How much longer until the newest input has been unchanged for `settle`.
    fn wait_needed(&self, settle: Duration) -> Duration {
        let due = [self.inputs.config, self.inputs.passwd, self.inputs.group]
            .iter()
            .map(|id| id.settled_ns(settle))
            .max()
            .unwrap_or(0);
        let wait = due - self.taken_ns;
        if wait <= 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX))
        }
    }
}

fn now_ns() -> i128 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    }
}

/// Why the index was not used (the load then parsed the whole configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// There is no index for this configuration.
    Missing,
    /// The index (or its directory) could not be read.
    Unreadable(String),
    /// Wrong owner, mode or file type of the index or a directory above it.
    Insecure(String),
    /// Built from other versions of the configuration, `/etc/passwd` or `/etc/group`.
    Stale,
    /// Wrong magic, version or checksum, or a record that does not decode.
    Corrupt(&'static str),
    /// The caller asked for the whole configuration.
    NotAsked,
}

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unusable::Missing => f.write_str("missing"),
            Unusable::Unreadable(e) => write!(f, "unreadable: {e}"),
            Unusable::Insecure(e) => write!(f, "ignored: {e}"),
            Unusable::Stale => f.write_str(
                "stale (the configuration, /etc/passwd or /etc/group changed since it was built)",
            ),
            Unusable::Corrupt(what) => write!(f, "corrupt: {what}"),
            Unusable::NotAsked => f.write_str("not consulted"),
        }
    }
}

/// Why an index could not be written.
#[derive(Debug)]
pub enum IndexError {
    /// The configuration does not load (so it gets no index).
    Config(ConfigError),
    /// An input changed less than [`SETTLE_TIME`] ago or while the index was built.
    Unsettled,
    /// A file operation failed.
    Io(String),
    /// The configuration cannot be represented (duplicate names, times before 1970…).
    Unrepresentable(String),
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexError::Config(e) => write!(f, "{e}"),
            IndexError::Unsettled => f.write_str(
                "the configuration, /etc/passwd or /etc/group changed moments ago or while the index was built; run `kmsbastion index` again",
            ),
            IndexError::Io(e) => f.write_str(e),
            IndexError::Unrepresentable(e) => write!(f, "cannot index this configuration: {e}"),
        }
    }
}

impl std::error::Error for IndexError {}

/// Where index files live and who must own them (the system: [`INDEX_DIR`], root; tests: a
/// private directory and their own uid).
#[derive(Debug, Clone)]
pub(crate) struct Place {
    dir: PathBuf,
    owner: u32,
    check_ancestors: bool,
    settle: Duration,
}

impl Place {
    fn system() -> Place {
        Place {
            dir: PathBuf::from(INDEX_DIR),
            owner: 0,
            check_ancestors: true,
            settle: SETTLE_TIME,
        }
    }

    fn file_for(&self, config_path: &Path) -> PathBuf {
        self.dir.join(file_name(config_path))
    }

    /// The index directory (and, for the system place, every directory above it) is owned by
    /// root and not writable by group or others (above it, a sticky directory is accepted).
    fn check_dirs(&self) -> Result<(), Unusable> {
        let mut dir = Some(self.dir.as_path());
        let mut first = true;
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            let m = fs::symlink_metadata(d).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound if first => Unusable::Missing,
                _ => Unusable::Unreadable(format!("{}: {e}", d.display())),
            })?;
            let owner = if first { self.owner } else { 0 };
            let sticky = m.mode() & 0o1000 != 0 && !first;
            if !m.file_type().is_dir() {
                return Err(Unusable::Insecure(format!(
                    "{} is not a directory",
                    d.display()
                )));
            }
            if m.uid() != owner {
                return Err(Unusable::Insecure(format!(
                    "{} is owned by uid {}, not {owner}",
                    d.display(),
                    m.uid()
                )));
            }
            if m.mode() & 0o022 != 0 && !sticky {
                return Err(Unusable::Insecure(format!(
                    "{} is writable by group or others (mode {:04o})",
                    d.display(),
                    m.mode() & 0o7777
                )));
            }
            if !self.check_ancestors {
                break;
            }
            first = false;
            dir = d.parent();
        }
        Ok(())
    }
}

/// `<16 hex digits of sha256(absolute path)>.idx`: names the file, authenticates nothing.
fn file_name(config_path: &Path) -> String {
    let abs = std::path::absolute(config_path).unwrap_or_else(|_| config_path.to_owned());
    let digest = Sha256::digest(abs.as_os_str().as_bytes());
    format!("{}.idx", hex::encode(digest.get(..8).unwrap_or_default()))
}

/// The index file of the configuration at `config_path`.
pub fn index_path(config_path: &Path) -> PathBuf {
    Place::system().file_for(config_path)
}

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

/// What a scoped load needs; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// The whole configuration (the index is not consulted).
    Full,
    /// A composite login: the settings, its engineer, its host and the engineer's grants.
    /// Enough for `grant::evaluate`, `authorized_keys`, `passwd_by_name` and the broker.
    Login(&'a LoginString),
    /// A plain engineer: the settings, the engineer, its grants and every host they can
    /// cover (in file order). Enough for `grant::reachable` (the listing login).
    Engineer(&'a str),
    /// A user name as NSS sees it: the engineer (and for a composite name the host) it names,
    /// without grants (NSS never evaluates them; on such a configuration every grant check
    /// refuses).
    Name(&'a str),
    /// The engineer with this uid, without grants.
    Uid(u32),
    /// Every engineer in file order (the bastion group's members, enumeration), no hosts, no
    /// grants.
    Engineers,
}

/// How a [`load`] was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// From a fresh index.
    Index,
    /// The whole file was parsed because the index could not be used.
    FullLoad {
        /// Why the index was not used.
        why: Unusable,
        /// The inputs' identities taken before the files were read (for [`refresh`]).
        snapshot: Option<Box<Snapshot>>,
    },
}

/// A configuration and how it was obtained.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The (scoped, or when loaded in full, whole) configuration.
    pub config: Config,
    /// Index or full load.
    pub via: Via,
}

impl Config {
    /// The configuration at `path`, restricted to `scope`, from the index when it is fresh
    /// and trustworthy, else from a full [`Config::load`] (same errors).
    pub fn load_scoped(path: &Path, scope: Scope<'_>) -> Result<Config, ConfigError> {
        load(path, scope).map(|l| l.config)
    }

    /// [`Config::load_scoped`] for an SSH/PAM user name: a composite login gets
    /// [`Scope::Login`], anything else [`Scope::Name`].
    pub fn load_for_user(path: &Path, user: &str) -> Result<Config, ConfigError> {
        load_for_user(path, user).map(|l| l.config)
    }
}

/// [`Config::load_scoped`], saying whether the index answered.
pub fn load(path: &Path, scope: Scope<'_>) -> Result<Loaded, ConfigError> {
    load_in(&Place::system(), path, scope)
}

/// [`Config::load_for_user`], saying whether the index answered.
pub fn load_for_user(path: &Path, user: &str) -> Result<Loaded, ConfigError> {
    match Login::parse(user) {
        Ok(Login::Composite(l)) => load(path, Scope::Login(&l)),
        _ => load(path, Scope::Name(user)),
    }
}

pub(crate) fn load_in(place: &Place, path: &Path, scope: Scope<'_>) -> Result<Loaded, ConfigError> {
    let why = if scope == Scope::Full {
        Unusable::NotAsked
    } else {
        match Index::open_in(place, path).and_then(|ix| ix.scoped(path, scope)) {
            Ok(config) => {
                return Ok(Loaded {
                    config,
                    via: Via::Index,
                })
            }
            Err(why) => why,
        }
    };
    let snapshot = Snapshot::take(path).ok().map(Box::new);
    let config = Config::load(path)?;
    Ok(Loaded {
        config,
        via: Via::FullLoad { why, snapshot },
    })
}

/// A verified index: its header and directory in memory, records read from the file on
/// demand (each checked against its own checksum).
#[derive(Debug)]
pub struct Index {
    path: PathBuf,
    owner: u32,
    /// `(st_dev, st_ino)` of the verified file: records are read from that file only.
    file_id: (u64, u64),
    file: Option<File>,
    dir: Vec<u8>,
    records_at: u64,
    records_len: u64,
    inputs: Inputs,
}

impl Index {
    /// The index of the configuration at `config_path`, if it is present, trustworthy and
    /// fresh (see the module documentation).
    pub fn open(config_path: &Path) -> Result<Index, Unusable> {
        Index::open_in(&Place::system(), config_path)
    }

    pub(crate) fn open_in(place: &Place, config_path: &Path) -> Result<Index, Unusable> {
        place.check_dirs()?;
        let path = place.file_for(config_path);
        let (file, m) = open_checked(&path, place.owner)?;
        let mut head = [0u8; HEADER_LEN];
        read_at(&file, &mut head, 0, &path)?;
        let header = Header::decode(&head)?;
        let current = Inputs::current(config_path).map_err(|_| Unusable::Stale)?;
        if header.inputs != current {
            return Err(Unusable::Stale);
        }
        let records_at = (HEADER_LEN as u64)
            .checked_add(header.dir_len)
            .ok_or(Unusable::Corrupt("bad directory length"))?;
        if records_at.checked_add(header.records_len) != Some(m.len()) {
            return Err(Unusable::Corrupt("truncated or overlong"));
        }
        let mut dir = vec![0u8; usize::try_from(header.dir_len).map_err(|_| BAD)?];
        read_at(&file, &mut dir, HEADER_LEN as u64, &path)?;
        let prefix = head.get(..HEADER_PREFIX_LEN).ok_or(BAD)?;
        if xxh64(&dir, xxh64(prefix, 0)) != header.checksum {
            return Err(Unusable::Corrupt("checksum mismatch"));
        }
        Ok(Index {
            path,
            owner: place.owner,
            file_id: (m.dev(), m.ino()),
            file: Some(file),
            dir,
            records_at,
            records_len: header.records_len,
            inputs: current,
        })
    }

    /// The inputs' identities this index was verified against.
    pub fn inputs(&self) -> &Inputs {
        &self.inputs
    }

    /// Size of the index file in bytes.
    pub fn len(&self) -> u64 {
        self.records_at.saturating_add(self.records_len)
    }

    /// Whether the index is empty (never: a verified index has a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the file; later lookups reopen it (and check it is still the file that was
    /// verified). For long-lived holders such as the NSS module, which must not keep a
    /// descriptor open in the programs it is loaded into.
    pub fn close_file(&mut self) {
        self.file = None;
    }

    /// The configuration restricted to `scope` (`origin` is what its errors and logs name).
    pub fn scoped(&self, origin: &Path, scope: Scope<'_>) -> Result<Config, Unusable> {
        let reopened;
        let file = match &self.file {
            Some(f) => f,
            None => {
                let (f, m) = open_checked(&self.path, self.owner)?;
                if (m.dev(), m.ino()) != self.file_id {
                    return Err(Unusable::Stale);
                }
                reopened = f;
                &reopened
            }
        };
        let records = FileRecords {
            file,
            path: &self.path,
            at: self.records_at,
            len: self.records_len,
        };
        Body::parse(&self.dir, &records)?.scoped(origin, scope)
    }
}

/// Opens an index file without following a link and checks type, owner and mode.
fn open_checked(path: &Path, owner: u32) -> Result<(File, fs::Metadata), Unusable> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match (e.kind(), e.raw_os_error()) {
            (io::ErrorKind::NotFound, _) => Unusable::Missing,
            (_, Some(libc::ELOOP)) => {
                Unusable::Insecure(format!("{} is a symbolic link", path.display()))
            }
            _ => Unusable::Unreadable(format!("{}: {e}", path.display())),
        })?;
    let m = file
        .metadata()
        .map_err(|e| Unusable::Unreadable(format!("{}: {e}", path.display())))?;
    if !m.file_type().is_file() {
        return Err(Unusable::Insecure(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    if m.uid() != owner {
        return Err(Unusable::Insecure(format!(
            "{} is owned by uid {}, not {owner}",
            path.display(),
            m.uid(),
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(Unusable::Insecure(format!(
            "{} is writable by group or others (mode {:04o})",
            path.display(),
            m.mode() & 0o7777
        )));
    }
    if m.len() > MAX_INDEX_SIZE {
        return Err(Unusable::Corrupt("larger than any index"));
    }
    Ok((file, m))
}

fn read_at(file: &File, buf: &mut [u8], offset: u64, path: &Path) -> Result<(), Unusable> {
    file.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Unusable::Corrupt("truncated"),
        _ => Unusable::Unreadable(format!("{}: {e}", path.display())),
    })
}

const BAD: Unusable = Unusable::Corrupt("a record does not decode");

/// Where records come from: the index file, or (building, tests) the encoded bytes.
trait Records {
    /// The payload of the record at `off` (relative to the records region), `len` bytes
    /// including its 8-byte checksum, verified.
    fn read(&self, off: usize, len: usize) -> Result<Vec<u8>, Unusable>;
}

struct FileRecords<'a> {
    file: &'a File,
    path: &'a Path,
    at: u64,
    len: u64,
}

impl Records for FileRecords<'_> {
    fn read(&self, off: usize, len: usize) -> Result<Vec<u8>, Unusable> {
        let (off64, len64) = (off as u64, len as u64);
        if off64.checked_add(len64).is_none_or(|end| end > self.len) || len < 8 {
            return Err(BAD);
        }
        let mut buf = vec![0u8; len];
        read_at(self.file, &mut buf, self.at + off64, self.path)?;
        verify_record(buf)
    }
}

/// Records held in memory.
struct MemRecords<'a>(&'a [u8]);

impl Records for MemRecords<'_> {
    fn read(&self, off: usize, len: usize) -> Result<Vec<u8>, Unusable> {
        let end = off.checked_add(len).ok_or(BAD)?;
        verify_record(self.0.get(off..end).ok_or(BAD)?.to_vec())
    }
}

/// Checks a record's leading XXH64 and returns its payload.
fn verify_record(mut buf: Vec<u8>) -> Result<Vec<u8>, Unusable> {
    let mut r = Reader::new(&buf);
    let sum = r.u64()?;
    let payload = buf.get(8..).ok_or(BAD)?;
    if xxh64(payload, 0) != sum {
        return Err(Unusable::Corrupt("record checksum mismatch"));
    }
    buf.drain(..8);
    Ok(buf)
}

struct Header {
    inputs: Inputs,
    dir_len: u64,
    records_len: u64,
    checksum: u64,
}

impl Header {
    fn decode(bytes: &[u8]) -> Result<Header, Unusable> {
        let mut r = Reader::new(bytes);
        if r.take(MAGIC.len()).ok() != Some(MAGIC.as_slice()) {
            return Err(Unusable::Corrupt("not an index file"));
        }
        if r.u32()? != INDEX_FORMAT_VERSION {
            return Err(Unusable::Corrupt("another format version"));
        }
        let _flags = r.u32()?;
        let mut id = || -> Result<FileIdentity, Unusable> {
            Ok(FileIdentity {
                dev: r.u64()?,
                ino: r.u64()?,
                size: r.u64()?,
                mtime_sec: r.i64()?,
                mtime_nsec: r.i64()?,
                ctime_sec: r.i64()?,
                ctime_nsec: r.i64()?,
            })
        };
        let inputs = Inputs {
            config: id()?,
            passwd: id()?,
            group: id()?,
        };
        Ok(Header {
            inputs,
            dir_len: r.u64()?,
            records_len: r.u64()?,
            checksum: r.u64()?,
        })
    }
}

/// Bounds-checked little-endian reader: every read is checked, none panics.
#[derive(Clone)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }
    fn at(buf: &'a [u8], pos: usize) -> Result<Reader<'a>, Unusable> {
        if pos > buf.len() {
            return Err(BAD);
        }
        Ok(Reader { buf, pos })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], Unusable> {
        let end = self.pos.checked_add(n).ok_or(BAD)?;
        let s = self.buf.get(self.pos..end).ok_or(BAD)?;
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Unusable> {
        self.take(N)?.try_into().map_err(|_| BAD)
    }
    fn u8(&mut self) -> Result<u8, Unusable> {
        Ok(u8::from_le_bytes(self.array()?))
    }
    fn u16(&mut self) -> Result<u16, Unusable> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, Unusable> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, Unusable> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, Unusable> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn usize(&mut self) -> Result<usize, Unusable> {
        usize::try_from(self.u32()?).map_err(|_| BAD)
    }
    fn bool(&mut self) -> Result<bool, Unusable> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(BAD),
        }
    }
    fn str(&mut self) -> Result<&'a str, Unusable> {
        let n = self.usize()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| BAD)
    }
    fn string(&mut self) -> Result<String, Unusable> {
        self.str().map(str::to_owned)
    }
    fn opt_string(&mut self) -> Result<Option<String>, Unusable> {
        if self.bool()? {
            self.string().map(Some)
        } else {
            Ok(None)
        }
    }
    fn opt_path(&mut self) -> Result<Option<PathBuf>, Unusable> {
        Ok(self.opt_string()?.map(PathBuf::from))
    }
    fn path(&mut self) -> Result<PathBuf, Unusable> {
        self.string().map(PathBuf::from)
    }
    /// A count of items each at least `min_size` bytes long: never more than the bytes left
    /// can hold, so a corrupt count cannot make us allocate much.
    fn count(&mut self, min_size: usize) -> Result<usize, Unusable> {
        let n = self.usize()?;
        let left = self.buf.len().saturating_sub(self.pos);
        if n.checked_mul(min_size.max(1))
            .is_none_or(|need| need > left)
        {
            return Err(BAD);
        }
        Ok(n)
    }
    fn strings(&mut self) -> Result<Vec<String>, Unusable> {
        let n = self.count(4)?;
        (0..n).map(|_| self.string()).collect()
    }
    fn opt_time(&mut self) -> Result<Option<SystemTime>, Unusable> {
        if !self.bool()? {
            return Ok(None);
        }
        let secs = self.u64()?;
        let nanos = self.u32()?;
        if nanos >= 1_000_000_000 {
            return Err(BAD);
        }
        UNIX_EPOCH
            .checked_add(Duration::new(secs, nanos))
            .map(Some)
            .ok_or(BAD)
    }
    /// The reader must have consumed its buffer exactly.
    fn finish(&self) -> Result<(), Unusable> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(BAD)
        }
    }
}

/// A table of fixed-width entries in the directory: `u32 count`, then the entries.
#[derive(Clone, Copy)]
struct Table {
    start: usize,
    len: usize,
    width: usize,
}

/// Widths of the directory tables (see [`encode_parts`] for their fields).
const NAMED_WIDTH: usize = 16;
const UID_WIDTH: usize = 8;
const ORDER_WIDTH: usize = 4;
const GRANT_WIDTH: usize = 12;

/// The directory of an index and where its records come from.
struct Body<'a> {
    d: &'a [u8],
    records: &'a dyn Records,
    settings: usize,
    names: usize,
    eng_by_name: Table,
    eng_by_uid: Table,
    eng_order: Table,
    host_by_name: Table,
    host_order: Table,
    grants: Table,
}

impl<'a> Body<'a> {
    fn parse(d: &'a [u8], records: &'a dyn Records) -> Result<Body<'a>, Unusable> {
        let mut r = Reader::new(d);
        let mut offs = [0usize; SECTIONS];
        for o in offs.iter_mut() {
            *o = r.usize()?;
        }
        let [settings, names, by_name, by_uid, e_order, h_by_name, h_order, grants] = offs;
        let table = |off: usize, width: usize| -> Result<Table, Unusable> {
            let mut r = Reader::at(d, off)?;
            let len = r.count(width)?;
            Ok(Table {
                start: r.pos,
                len,
                width,
            })
        };
        Reader::at(d, settings)?;
        Reader::at(d, names)?;
        Ok(Body {
            d,
            records,
            settings,
            names,
            eng_by_name: table(by_name, NAMED_WIDTH)?,
            eng_by_uid: table(by_uid, UID_WIDTH)?,
            eng_order: table(e_order, ORDER_WIDTH)?,
            host_by_name: table(h_by_name, NAMED_WIDTH)?,
            host_order: table(h_order, ORDER_WIDTH)?,
            grants: table(grants, GRANT_WIDTH)?,
        })
    }

    /// A reader at entry `i` of `t`.
    fn entry(&self, t: Table, i: usize) -> Result<Reader<'a>, Unusable> {
        if i >= t.len {
            return Err(BAD);
        }
        let pos = i
            .checked_mul(t.width)
            .and_then(|x| x.checked_add(t.start))
            .ok_or(BAD)?;
        Reader::at(self.d, pos)
    }

    /// The name of entry `i` of a named table (`name_off u32, name_len u32, …`).
    fn name(&self, t: Table, i: usize) -> Result<&'a str, Unusable> {
        let mut e = self.entry(t, i)?;
        let off = self.names.checked_add(e.usize()?).ok_or(BAD)?;
        let len = e.usize()?;
        let end = off.checked_add(len).ok_or(BAD)?;
        std::str::from_utf8(self.d.get(off..end).ok_or(BAD)?).map_err(|_| BAD)
    }

    /// The record of entry `i` of a named table (`…, rec_off u32, rec_len u32`).
    fn named_record(&self, t: Table, i: usize) -> Result<Vec<u8>, Unusable> {
        let mut e = self.entry(t, i)?;
        e.take(8)?;
        let (off, len) = (e.usize()?, e.usize()?);
        self.records.read(off, len)
    }

    /// Binary search of a name-sorted table.
    fn find(&self, t: Table, name: &str) -> Result<Option<usize>, Unusable> {
        let (mut lo, mut hi) = (0usize, t.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.name(t, mid)?.cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(mid)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Engineer number `i` of the name-sorted table, with its grant numbers.
    fn engineer(&self, i: usize) -> Result<(Engineer, Vec<usize>), Unusable> {
        let payload = self.named_record(self.eng_by_name, i)?;
        let mut r = Reader::new(&payload);
        let e = decode_engineer(&mut r)?;
        r.finish()?;
        if e.0.name != self.name(self.eng_by_name, i)? {
            return Err(Unusable::Corrupt("directory and record disagree"));
        }
        Ok(e)
    }

    fn engineer_by_name(&self, name: &str) -> Result<Option<(Engineer, Vec<usize>)>, Unusable> {
        match self.find(self.eng_by_name, name)? {
            Some(i) => self.engineer(i).map(Some),
            None => Ok(None),
        }
    }

    fn engineer_by_uid(&self, uid: u32) -> Result<Option<(Engineer, Vec<usize>)>, Unusable> {
        let t = self.eng_by_uid;
        let (mut lo, mut hi) = (0usize, t.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let mut e = self.entry(t, mid)?;
            match e.u32()?.cmp(&uid) {
                std::cmp::Ordering::Equal => {
                    let found = self.engineer(e.usize()?)?;
                    return if found.0.uid == uid {
                        Ok(Some(found))
                    } else {
                        Err(Unusable::Corrupt("directory and record disagree"))
                    };
                }
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Host number `i` of the name-sorted table.
    fn host(&self, i: usize) -> Result<Host, Unusable> {
        let payload = self.named_record(self.host_by_name, i)?;
        let mut r = Reader::new(&payload);
        let h = decode_host(&mut r)?;
        r.finish()?;
        if h.name != self.name(self.host_by_name, i)? {
            return Err(Unusable::Corrupt("directory and record disagree"));
        }
        Ok(h)
    }

    fn host_by_name(&self, name: &str) -> Result<Option<Host>, Unusable> {
        match self.find(self.host_by_name, name)? {
            Some(i) => self.host(i).map(Some),
            None => Ok(None),
        }
    }

    /// Entry `i` of an order table: an index into the matching name-sorted table.
    fn order(&self, t: Table, i: usize) -> Result<usize, Unusable> {
        self.entry(t, i)?.usize()
    }

    fn grant(&self, i: usize) -> Result<GrantRule, Unusable> {
        let mut e = self.entry(self.grants, i)?;
        let (off, len, line) = (e.usize()?, e.usize()?, e.usize()?);
        let payload = self.records.read(off, len)?;
        let mut r = Reader::new(&payload);
        let rule = decode_grant(&mut r)?;
        r.finish()?;
        if rule.line != line {
            return Err(Unusable::Corrupt("directory and record disagree"));
        }
        Ok(rule)
    }

    fn grant_line(&self, i: usize) -> Result<usize, Unusable> {
        let mut e = self.entry(self.grants, i)?;
        e.take(8)?;
        e.usize()
    }

    /// The grant list of the full configuration as seen by `engineer`: the rules numbered in
    /// `numbers` (ascending) in full, every rule before them an inert placeholder.
    fn grants_for(
        &self,
        engineer: &Engineer,
        numbers: &[usize],
    ) -> Result<Vec<GrantRule>, Unusable> {
        let Some(&last) = numbers.last() else {
            return Ok(Vec::new());
        };
        let n = last.checked_add(1).ok_or(BAD)?;
        if n > self.grants.len {
            return Err(BAD);
        }
        let mut out = Vec::with_capacity(n);
        let mut wanted = numbers.iter().copied().peekable();
        for i in 0..n {
            if wanted.peek() == Some(&i) {
                wanted.next();
                let rule = self.grant(i)?;
                // The per-engineer list is derived from `applies_to`; re-check it, so that a
                // damaged list can only drop rules (refuse), never add one.
                if !rule.applies_to(engineer) {
                    return Err(BAD);
                }
                out.push(rule);
            } else {
                out.push(inert_rule(self.grant_line(i)?));
            }
        }
        if wanted.next().is_some() {
            return Err(Unusable::Corrupt("grant numbers out of order"));
        }
        Ok(out)
    }

    fn settings(&self) -> Result<(KmsSettings, BastionSettings, AuditSettings), Unusable> {
        decode_settings(&mut Reader::at(self.d, self.settings)?)
    }

    fn scoped(&self, origin: &Path, scope: Scope<'_>) -> Result<Config, Unusable> {
        let (kms, bastion, audit) = self.settings()?;
        let mut hosts = Vec::new();
        let mut engineers = Vec::new();
        let mut grants = Vec::new();
        match scope {
            Scope::Full => {
                for i in 0..self.eng_order.len {
                    engineers.push(self.engineer(self.order(self.eng_order, i)?)?.0);
                }
                for i in 0..self.host_order.len {
                    hosts.push(self.host(self.order(self.host_order, i)?)?);
                }
                for i in 0..self.grants.len {
                    grants.push(self.grant(i)?);
                }
            }
            Scope::Login(login) => {
                if let Some((e, numbers)) = self.engineer_by_name(&login.engineer)? {
                    grants = self.grants_for(&e, &numbers)?;
                    engineers.push(e);
                }
                hosts.extend(self.host_by_name(&login.host)?);
            }
            Scope::Engineer(name) => {
                if let Some((e, numbers)) = self.engineer_by_name(name)? {
                    grants = self.grants_for(&e, &numbers)?;
                    engineers.push(e);
                    let live: Vec<&GrantRule> =
                        grants.iter().filter(|g| g.applies_to_anyone()).collect();
                    for i in 0..self.host_order.len {
                        let j = self.order(self.host_order, i)?;
                        let name = self.name(self.host_by_name, j)?;
                        // Cheap pre-check on the name alone before reading the record.
                        if !live.iter().any(|g| g.covers_host(name)) {
                            continue;
                        }
                        let h = self.host(j)?;
                        let covered = h
                            .accounts
                            .iter()
                            .any(|a| live.iter().any(|g| g.covers(&a.name, &h.name)));
                        if covered {
                            hosts.push(h);
                        }
                    }
                }
            }
            Scope::Name(name) => match Login::parse(name) {
                Ok(Login::Plain(e)) => engineers.extend(self.engineer_by_name(&e)?.map(|x| x.0)),
                Ok(Login::Composite(l)) => {
                    engineers.extend(self.engineer_by_name(&l.engineer)?.map(|x| x.0));
                    hosts.extend(self.host_by_name(&l.host)?);
                }
                Err(_) => {}
            },
            Scope::Uid(uid) => engineers.extend(self.engineer_by_uid(uid)?.map(|x| x.0)),
            Scope::Engineers => {
                for i in 0..self.eng_order.len {
                    engineers.push(self.engineer(self.order(self.eng_order, i)?)?.0);
                }
            }
        }
        Ok(Config {
            kms,
            bastion,
            audit,
            hosts,
            engineers,
            grants,
            warnings: Vec::new(),
            origin: origin.to_owned(),
        })
    }
}

impl GrantRule {
    /// Whether the rule names any engineer or group (placeholders name none).
    fn applies_to_anyone(&self) -> bool {
        !self.engineers.is_empty() || !self.groups.is_empty()
    }

    /// Whether some pattern's host side matches `host` (a necessary condition of `covers`).
    fn covers_host(&self, host: &str) -> bool {
        self.accounts.iter().any(|p| {
            p.split_once('@')
                .is_some_and(|(_, ph)| pattern_matches(&format!("*@{ph}"), "", host))
        })
    }
}

/// A rule that applies to nobody and covers nothing: keeps the numbering of the rules.
fn inert_rule(line: usize) -> GrantRule {
    GrantRule {
        engineers: Vec::new(),
        groups: Vec::new(),
        accounts: Vec::new(),
        from: Vec::new(),
        not_before: None,
        not_after: None,
        line,
    }
}

fn decode_settings(
    r: &mut Reader<'_>,
) -> Result<(KmsSettings, BastionSettings, AuditSettings), Unusable> {
    let region = r.opt_string()?;
    let network = match r.u8()? {
        0 => Network::Public,
        1 => Network::Vpc,
        _ => return Err(BAD),
    };
    let endpoint = r.opt_string()?;
    let credentials = match r.u8()? {
        0 => CredentialSource::Chain,
        1 => CredentialSource::Env,
        2 => CredentialSource::File,
        3 => CredentialSource::EcsRamRole,
        _ => return Err(BAD),
    };
    let credentials_file = r.opt_path()?;
    let ram_role = r.opt_string()?;
    let deadline_ms = r.u64()?;
    let ca_file = r.opt_path()?;
    let signature = match r.u8()? {
        0 => SignatureAlgorithm::V3,
        1 => SignatureAlgorithm::V1,
        _ => return Err(BAD),
    };
    let kms = KmsSettings {
        region,
        network,
        endpoint,
        credentials,
        credentials_file,
        ram_role,
        deadline_ms,
        ca_file,
        signature,
    };
    let bastion = BastionSettings {
        group: r.string()?,
        gid: r.u32()?,
        uid_min: r.u32()?,
        uid_max: r.u32()?,
        home: r.path()?,
        shell: r.path()?,
        broker: r.path()?,
        service_user: r.string()?,
        ssh: r.path()?,
        runtime_dir: r.path()?,
        connect_timeout_s: r.u32()?,
    };
    let audit = AuditSettings {
        file: r.opt_path()?,
        syslog: r.bool()?,
    };
    Ok((kms, bastion, audit))
}

fn decode_engineer(r: &mut Reader<'_>) -> Result<(Engineer, Vec<usize>), Unusable> {
    let name = r.string()?;
    let uid = r.u32()?;
    let keys = r.strings()?;
    let groups = r.strings()?;
    let n = r.count(4)?;
    let mut grants = Vec::with_capacity(n);
    for _ in 0..n {
        let g = r.usize()?;
        if grants.last().is_some_and(|&prev| prev >= g) {
            return Err(Unusable::Corrupt("grant numbers out of order"));
        }
        grants.push(g);
    }
    Ok((
        Engineer {
            name,
            uid,
            keys,
            groups,
        },
        grants,
    ))
}

fn decode_host(r: &mut Reader<'_>) -> Result<Host, Unusable> {
    let name = r.string()?;
    let address = r.string()?;
    let port = r.u16()?;
    let host_keys = r.strings()?;
    let instance_id = r.opt_string()?;
    let n = r.count(8)?;
    let mut accounts = Vec::with_capacity(n);
    for _ in 0..n {
        accounts.push(HostAccount {
            name: r.string()?,
            secret: r.string()?,
        });
    }
    Ok(Host {
        name,
        address,
        port,
        host_keys,
        instance_id,
        accounts,
    })
}

fn decode_grant(r: &mut Reader<'_>) -> Result<GrantRule, Unusable> {
    let engineers = r.strings()?;
    let groups = r.strings()?;
    let accounts = r.strings()?;
    let n = r.count(6)?;
    let mut from = Vec::with_capacity(n);
    for _ in 0..n {
        let addr = match r.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            _ => return Err(BAD),
        };
        let net = ipnet::IpNet::new(addr, r.u8()?).map_err(|_| BAD)?;
        from.push(net);
    }
    let not_before = r.opt_time()?;
    let not_after = r.opt_time()?;
    let line = usize::try_from(r.u64()?).map_err(|_| BAD)?;
    Ok(GrantRule {
        engineers,
        groups,
        accounts,
        from,
        not_before,
        not_after,
        line,
    })
}

// ---------------------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------------------

/// What [`build`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The index file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: usize,
    /// Engineers, hosts and grants indexed.
    pub engineers: usize,
    /// See `engineers`.
    pub hosts: usize,
    /// See `engineers`.
    pub grants: usize,
}

/// Loads the configuration at `config_path` in full (waiting up to [`SETTLE_TIME`] for
/// inputs that changed moments ago) and writes its index. A configuration that does not load
/// gets its old index removed and the load error back. Needs root.
pub fn build(config_path: &Path) -> Result<Built, IndexError> {
    build_in(&Place::system(), config_path)
}

pub(crate) fn build_in(place: &Place, config_path: &Path) -> Result<Built, IndexError> {
    let io_err = |e: io::Error| IndexError::Io(format!("{}: {e}", config_path.display()));
    let mut snapshot = Snapshot::take(config_path).map_err(|e| {
        // Let the loader phrase a missing or unreadable file.
        match Config::load(config_path) {
            Err(ce) => IndexError::Config(ce),
            Ok(_) => io_err(e),
        }
    })?;
    for _ in 0..3 {
        let wait = snapshot.wait_needed(place.settle);
        if wait.is_zero() {
            break;
        }
        std::thread::sleep(wait + Duration::from_millis(10));
        snapshot = Snapshot::take(config_path).map_err(io_err)?;
    }
    match Config::load(config_path) {
        Ok(cfg) => write_in(place, config_path, &cfg, &snapshot),
        Err(e) => {
            remove_in(place, config_path);
            Err(IndexError::Config(e))
        }
    }
}

/// Writes the index of `cfg`, a configuration just loaded in full from `config_path` by a
/// caller that took `snapshot` before loading it (see [`refresh`]); refuses when an input changed
/// since the snapshot or moments before it.
pub(crate) fn write(
    config_path: &Path,
    cfg: &Config,
    snapshot: &Snapshot,
) -> Result<Built, IndexError> {
    write_in(&Place::system(), config_path, cfg, snapshot)
}

/// After a [`load`] that parsed the whole file (the index was missing, stale or not
/// trusted): write the index from that configuration, without a second parse. `Ok(None)` when
/// the index answered the load (it is fresh). Needs root.
pub fn refresh(config_path: &Path, loaded: &Loaded) -> Result<Option<Built>, IndexError> {
    match &loaded.via {
        Via::Index => Ok(None),
        Via::FullLoad { snapshot: None, .. } => Err(IndexError::Unsettled),
        Via::FullLoad {
            snapshot: Some(s), ..
        } => write(config_path, &loaded.config, s).map(Some),
    }
}

/// Removes the index of `config_path`, if any (best effort).
pub fn remove(config_path: &Path) {
    remove_in(&Place::system(), config_path)
}

fn remove_in(place: &Place, config_path: &Path) {
    let _ = fs::remove_file(place.file_for(config_path));
}

pub(crate) fn write_in(
    place: &Place,
    config_path: &Path,
    cfg: &Config,
    snapshot: &Snapshot,
) -> Result<Built, IndexError> {
    if !snapshot.wait_needed(place.settle).is_zero() {
        return Err(IndexError::Unsettled);
    }
    let bytes = encode(cfg, &snapshot.inputs)?;
    match Inputs::current(config_path) {
        Ok(now) if now == snapshot.inputs => {}
        _ => return Err(IndexError::Unsettled),
    }
    let dir = &place.dir;
    let io_err =
        |what: &str, e: io::Error| IndexError::Io(format!("{what} {}: {e}", dir.display()));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io_err("cannot create", e))?;
    place
        .check_dirs()
        .map_err(|u| IndexError::Io(format!("index directory {u}")))?;
    let target = place.file_for(config_path);
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name(config_path),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(|e| io_err("cannot write into", e))?;
    let result = (|| -> Result<(), IndexError> {
        let io = |e: io::Error| IndexError::Io(format!("{}: {e}", tmp.display()));
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io)?;
        let owner = file.metadata().map_err(io)?.uid();
        if owner != place.owner {
            return Err(IndexError::Io(format!(
                "must run as uid {} to write the index (running as uid {owner})",
                place.owner
            )));
        }
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &target).map_err(io)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Built {
        path: target,
        bytes: bytes.len(),
        engineers: cfg.engineers.len(),
        hosts: cfg.hosts.len(),
        grants: cfg.grants.len(),
    })
}

/// Little-endian writer of the format [`Reader`] reads.
#[derive(Default)]
struct Writer {
    b: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.b.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.b.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) -> Result<(), IndexError> {
        let n = u32::try_from(n).map_err(|_| too_large())?;
        self.u32(n);
        Ok(())
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn str(&mut self, s: &str) -> Result<(), IndexError> {
        self.len(s.len())?;
        self.b.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn path(&mut self, p: &Path) -> Result<(), IndexError> {
        let s = p.to_str().ok_or_else(|| {
            IndexError::Unrepresentable(format!("path {} is not UTF-8", p.display()))
        })?;
        self.str(s)
    }
    fn opt_str(&mut self, s: Option<&str>) -> Result<(), IndexError> {
        self.bool(s.is_some());
        s.map_or(Ok(()), |s| self.str(s))
    }
    fn opt_path(&mut self, p: Option<&Path>) -> Result<(), IndexError> {
        self.bool(p.is_some());
        p.map_or(Ok(()), |p| self.path(p))
    }
    fn strings(&mut self, v: &[String]) -> Result<(), IndexError> {
        self.len(v.len())?;
        v.iter().try_for_each(|s| self.str(s))
    }
    fn opt_time(&mut self, t: Option<SystemTime>) -> Result<(), IndexError> {
        self.bool(t.is_some());
        if let Some(t) = t {
            let d = t
                .duration_since(UNIX_EPOCH)
                .map_err(|_| IndexError::Unrepresentable("a grant time before 1970".into()))?;
            self.u64(d.as_secs());
            self.u32(d.subsec_nanos());
        }
        Ok(())
    }
    /// The current length as a body offset.
    fn offset(&self) -> Result<u32, IndexError> {
        u32::try_from(self.b.len()).map_err(|_| too_large())
    }
    fn patch_u32(&mut self, at: usize, v: u32) -> Result<(), IndexError> {
        let end = at.checked_add(4).ok_or_else(too_large)?;
        let slot = self.b.get_mut(at..end).ok_or_else(too_large)?;
        slot.copy_from_slice(&v.to_le_bytes());
        Ok(())
    }
}

fn too_large() -> IndexError {
    IndexError::Unrepresentable("larger than 4 GiB".into())
}

/// The whole index file for `cfg` and the inputs it was loaded from. Checks the result by
/// decoding it back in full.
fn encode(cfg: &Config, inputs: &Inputs) -> Result<Vec<u8>, IndexError> {
    let (dir, records) = encode_parts(cfg)?;
    let mut w = Writer::default();
    w.b.extend_from_slice(MAGIC);
    w.u32(INDEX_FORMAT_VERSION);
    w.u32(0);
    for id in [&inputs.config, &inputs.passwd, &inputs.group] {
        let FileIdentity {
            dev,
            ino,
            size,
            mtime_sec,
            mtime_nsec,
            ctime_sec,
            ctime_nsec,
        } = *id;
        w.u64(dev);
        w.u64(ino);
        w.u64(size);
        w.i64(mtime_sec);
        w.i64(mtime_nsec);
        w.i64(ctime_sec);
        w.i64(ctime_nsec);
    }
    w.u64(dir.len() as u64);
    w.u64(records.len() as u64);
    let sum = xxh64(&dir, xxh64(&w.b, 0));
    w.u64(sum);
    debug_assert_eq!(w.b.len(), HEADER_LEN);

    // Round trip: what a reader decodes is exactly what was loaded.
    let mem = MemRecords(&records);
    let check = Body::parse(&dir, &mem)
        .and_then(|b| b.scoped(cfg.origin(), Scope::Full))
        .map_err(|e| {
            IndexError::Unrepresentable(format!("the encoded index does not decode: {e}"))
        })?;
    let same = check.kms == cfg.kms
        && check.bastion == cfg.bastion
        && check.audit == cfg.audit
        && check.hosts == cfg.hosts
        && check.engineers == cfg.engineers
        && check.grants == cfg.grants;
    if !same {
        return Err(IndexError::Unrepresentable(
            "the encoded index does not decode to the configuration".into(),
        ));
    }
    w.b.extend_from_slice(&dir);
    w.b.extend_from_slice(&records);
    Ok(w.b)
}

/// Appends one record (its XXH64, then the payload `f` writes) to `records`; returns its
/// offset and length.
fn record(
    records: &mut Writer,
    f: impl FnOnce(&mut Writer) -> Result<(), IndexError>,
) -> Result<(u32, u32), IndexError> {
    let mut w = Writer::default();
    f(&mut w)?;
    let off = records.offset()?;
    records.u64(xxh64(&w.b, 0));
    records.b.extend_from_slice(&w.b);
    let len = u32::try_from(w.b.len() + 8).map_err(|_| too_large())?;
    Ok((off, len))
}

/// The directory and the records region.
///
/// Directory: 8 section offsets (`u32`), then the settings, a blob of names, and the tables,
/// each `u32 count` + entries:
/// engineers by name `(name_off, name_len, rec_off, rec_len)`, engineers by uid
/// `(uid, index by name)`, engineers in file order `(index by name)`, hosts by name and in
/// file order (the same shapes), grants in file order `(rec_off, rec_len, line)`.
/// Records: `xxh64 u64` + payload.
fn encode_parts(cfg: &Config) -> Result<(Vec<u8>, Vec<u8>), IndexError> {
    let Config {
        kms,
        bastion,
        audit,
        hosts,
        engineers,
        grants,
        warnings: _,
        origin: _,
    } = cfg;
    let mut rec = Writer::default();

    // Which rules apply to which engineer: by name and through groups, as `applies_to`.
    let mut by_name: std::collections::HashMap<&str, usize> = Default::default();
    let mut members: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for (i, e) in engineers.iter().enumerate() {
        if by_name.insert(&e.name, i).is_some() {
            return Err(IndexError::Unrepresentable(format!(
                "engineer {} twice",
                e.name
            )));
        }
        for g in &e.groups {
            members.entry(g).or_default().push(i);
        }
    }
    let mut rules_of: Vec<Vec<u32>> = vec![Vec::new(); engineers.len()];
    for (gi, rule) in grants.iter().enumerate() {
        let gi = u32::try_from(gi).map_err(|_| too_large())?;
        let direct = rule
            .engineers
            .iter()
            .filter_map(|n| by_name.get(n.as_str()));
        let grouped = rule
            .groups
            .iter()
            .filter_map(|g| members.get(g.as_str()))
            .flatten();
        for &ei in direct.chain(grouped) {
            if let Some(list) = rules_of.get_mut(ei) {
                if list.last() != Some(&gi) {
                    list.push(gi);
                }
            }
        }
    }

    let mut eng_recs = Vec::with_capacity(engineers.len());
    for (e, rules) in engineers.iter().zip(&rules_of) {
        let Engineer {
            name,
            uid,
            keys,
            groups,
        } = e;
        eng_recs.push(record(&mut rec, |w| {
            w.str(name)?;
            w.u32(*uid);
            w.strings(keys)?;
            w.strings(groups)?;
            w.len(rules.len())?;
            for &r in rules {
                w.u32(r);
            }
            Ok(())
        })?);
    }
    let mut host_recs = Vec::with_capacity(hosts.len());
    let mut host_names = std::collections::HashSet::new();
    for h in hosts {
        let Host {
            name,
            address,
            port,
            host_keys,
            instance_id,
            accounts,
        } = h;
        if !host_names.insert(name.as_str()) {
            return Err(IndexError::Unrepresentable(format!("host {name} twice")));
        }
        host_recs.push(record(&mut rec, |w| {
            w.str(name)?;
            w.str(address)?;
            w.u16(*port);
            w.strings(host_keys)?;
            w.opt_str(instance_id.as_deref())?;
            w.len(accounts.len())?;
            for HostAccount { name, secret } in accounts {
                w.str(name)?;
                w.str(secret)?;
            }
            Ok(())
        })?);
    }
    let mut grant_recs = Vec::with_capacity(grants.len());
    for g in grants {
        let GrantRule {
            engineers,
            groups,
            accounts,
            from,
            not_before,
            not_after,
            line,
        } = g;
        grant_recs.push(record(&mut rec, |w| {
            w.strings(engineers)?;
            w.strings(groups)?;
            w.strings(accounts)?;
            w.len(from.len())?;
            for net in from {
                match net.addr() {
                    IpAddr::V4(a) => {
                        w.u8(4);
                        w.b.extend_from_slice(&a.octets());
                    }
                    IpAddr::V6(a) => {
                        w.u8(6);
                        w.b.extend_from_slice(&a.octets());
                    }
                }
                w.u8(net.prefix_len());
            }
            w.opt_time(*not_before)?;
            w.opt_time(*not_after)?;
            w.u64(*line as u64);
            Ok(())
        })?);
    }

    // The directory.
    let mut d = Writer::default();
    for _ in 0..SECTIONS {
        d.u32(0);
    }
    let mut sections = [0u32; SECTIONS];
    sections[0] = d.offset()?;
    encode_settings(&mut d, kms, bastion, audit)?;

    let mut eng_sorted: Vec<usize> = (0..engineers.len()).collect();
    eng_sorted.sort_by(|&a, &b| engineer_name(engineers, a).cmp(engineer_name(engineers, b)));
    let mut host_sorted: Vec<usize> = (0..hosts.len()).collect();
    host_sorted.sort_by(|&a, &b| host_name(hosts, a).cmp(host_name(hosts, b)));
    // rank[i]: position of file-order item i in its sorted table.
    let rank = |sorted: &[usize]| {
        let mut r = vec![0u32; sorted.len()];
        for (pos, &i) in sorted.iter().enumerate() {
            if let Some(slot) = r.get_mut(i) {
                *slot = pos as u32;
            }
        }
        r
    };
    let (eng_rank, host_rank) = (rank(&eng_sorted), rank(&host_sorted));

    sections[1] = d.offset()?;
    let mut blob = Writer::default();
    let mut eng_name_at = Vec::with_capacity(engineers.len());
    for &i in &eng_sorted {
        eng_name_at.push((blob.offset()?, engineer_name(engineers, i).len()));
        blob.b
            .extend_from_slice(engineer_name(engineers, i).as_bytes());
    }
    let mut host_name_at = Vec::with_capacity(hosts.len());
    for &i in &host_sorted {
        host_name_at.push((blob.offset()?, host_name(hosts, i).len()));
        blob.b.extend_from_slice(host_name(hosts, i).as_bytes());
    }
    d.b.extend_from_slice(&blob.b);

    let named = |d: &mut Writer,
                 sorted: &[usize],
                 names: &[(u32, usize)],
                 recs: &[(u32, u32)]|
     -> Result<(), IndexError> {
        d.len(sorted.len())?;
        for (&i, &(name_off, name_len)) in sorted.iter().zip(names) {
            let (off, len) = recs.get(i).copied().ok_or_else(too_large)?;
            d.u32(name_off);
            d.len(name_len)?;
            d.u32(off);
            d.u32(len);
        }
        Ok(())
    };
    sections[2] = d.offset()?;
    named(&mut d, &eng_sorted, &eng_name_at, &eng_recs)?;

    let mut by_uid: Vec<(u32, u32)> = engineers
        .iter()
        .zip(&eng_rank)
        .map(|(e, &r)| (e.uid, r))
        .collect();
    by_uid.sort_unstable();
    if by_uid.windows(2).any(|p| matches!(p, [a, b] if a.0 == b.0)) {
        return Err(IndexError::Unrepresentable(
            "two engineers share a uid".into(),
        ));
    }
    sections[3] = d.offset()?;
    d.len(by_uid.len())?;
    for (uid, r) in by_uid {
        d.u32(uid);
        d.u32(r);
    }
    sections[4] = d.offset()?;
    d.len(eng_rank.len())?;
    for &r in &eng_rank {
        d.u32(r);
    }
    sections[5] = d.offset()?;
    named(&mut d, &host_sorted, &host_name_at, &host_recs)?;
    sections[6] = d.offset()?;
    d.len(host_rank.len())?;
    for &r in &host_rank {
        d.u32(r);
    }
    sections[7] = d.offset()?;
    d.len(grant_recs.len())?;
    for (g, &(off, len)) in grants.iter().zip(&grant_recs) {
        d.u32(off);
        d.u32(len);
        d.len(g.line)?;
    }
    for (i, s) in sections.iter().enumerate() {
        d.patch_u32(i * 4, *s)?;
    }
    Ok((d.b, rec.b))
}

fn engineer_name(engineers: &[Engineer], i: usize) -> &str {
    engineers.get(i).map_or("", |e| e.name.as_str())
}

fn host_name(hosts: &[Host], i: usize) -> &str {
    hosts.get(i).map_or("", |h| h.name.as_str())
}

fn encode_settings(
    w: &mut Writer,
    kms: &KmsSettings,
    bastion: &BastionSettings,
    audit: &AuditSettings,
) -> Result<(), IndexError> {
    let KmsSettings {
        region,
        network,
        endpoint,
        credentials,
        credentials_file,
        ram_role,
        deadline_ms,
        ca_file,
        signature,
    } = kms;
    w.opt_str(region.as_deref())?;
    w.u8(match network {
        Network::Public => 0,
        Network::Vpc => 1,
    });
    w.opt_str(endpoint.as_deref())?;
    w.u8(match credentials {
        CredentialSource::Chain => 0,
        CredentialSource::Env => 1,
        CredentialSource::File => 2,
        CredentialSource::EcsRamRole => 3,
    });
    w.opt_path(credentials_file.as_deref())?;
    w.opt_str(ram_role.as_deref())?;
    w.u64(*deadline_ms);
    w.opt_path(ca_file.as_deref())?;
    w.u8(match signature {
        SignatureAlgorithm::V3 => 0,
        SignatureAlgorithm::V1 => 1,
    });
    let BastionSettings {
        group,
        gid,
        uid_min,
        uid_max,
        home,
        shell,
        broker,
        service_user,
        ssh,
        runtime_dir,
        connect_timeout_s,
    } = bastion;
    w.str(group)?;
    w.u32(*gid);
    w.u32(*uid_min);
    w.u32(*uid_max);
    w.path(home)?;
    w.path(shell)?;
    w.path(broker)?;
    w.str(service_user)?;
    w.path(ssh)?;
    w.path(runtime_dir)?;
    w.u32(*connect_timeout_s);
    let AuditSettings { file, syslog } = audit;
    w.opt_path(file.as_deref())?;
    w.bool(*syslog);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// XXH64
// ---------------------------------------------------------------------------------------

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    for (d, s) in a.iter_mut().zip(b) {
        *d = *s;
    }
    u64::from_le_bytes(a)
}

fn xx_round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn xx_merge(acc: u64, val: u64) -> u64 {
    (acc ^ xx_round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 (Yann Collet's xxHash, 64-bit): a fast non-cryptographic checksum.
fn xxh64(data: &[u8], seed: u64) -> u64 {
    let mut h: u64;
    let mut stripes = data.chunks_exact(32);
    if data.len() >= 32 {
        let mut v = [
            seed.wrapping_add(P1).wrapping_add(P2),
            seed.wrapping_add(P2),
            seed,
            seed.wrapping_sub(P1),
        ];
        for stripe in stripes.by_ref() {
            for (acc, lane) in v.iter_mut().zip(stripe.chunks_exact(8)) {
                *acc = xx_round(*acc, le64(lane));
            }
        }
        let [v1, v2, v3, v4] = v;
        h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        for lane in v {
            h = xx_merge(h, lane);
        }
    } else {
        h = seed.wrapping_add(P5);
    }
    h = h.wrapping_add(data.len() as u64);
    let mut rest = stripes.remainder();
    while let Some((word, tail)) = rest.split_first_chunk::<8>() {
        h ^= xx_round(0, u64::from_le_bytes(*word));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = tail;
    }
    if let Some((word, tail)) = rest.split_first_chunk::<4>() {
        h ^= u64::from(u32::from_le_bytes(*word)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = tail;
    }
    for &byte in rest {
        h ^= u64::from(byte).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    h
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
