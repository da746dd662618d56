//! The index answers exactly like the full configuration, and falls back whenever it cannot
//! be trusted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use super::*;
use crate::authorized_keys::{authorized_keys, OfferedKey};
use crate::grant;
use crate::passwd;
use base64::Engine as _;
use rand::rngs::StdRng;
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use std::net::IpAddr;

const ACCOUNTS: [&str; 3] = ["root", "deploy", "app"];
const GROUPS: [&str; 4] = ["ops", "dev", "dba", "sec"];

fn key(rng: &mut StdRng, comment: &str) -> String {
    let mut blob = Vec::new();
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    let k: [u8; 32] = rng.gen();
    blob.extend_from_slice(&k);
    let b64 = base64::engine::general_purpose::STANDARD.encode(blob);
    format!("ssh-ed25519 {b64} {comment}").trim_end().to_owned()
}

fn rfc(t: SystemTime) -> String {
    format_rfc3339_utc(t)
}

/// A random but valid configuration: shuffled file order, groups, globs, `from`, windows
/// in the past, present and future.
fn generate(seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let mut out = String::from(
        "[kms]\nendpoint = \"http://127.0.0.1:9100\"\n\n[bastion]\ngroup = \"kmsbidx-test\"\ngid = 371717\nuid_min = 300001\nuid_max = 399999\n\n[audit]\nsyslog = false\n\n",
    );
    let n_hosts = rng.gen_range(1..14);
    let mut host_names: Vec<String> = (0..n_hosts)
        .map(|i| format!("{}-{:02}", ["web", "db", "app"][i % 3], i))
        .collect();
    host_names.shuffle(&mut rng);
    let mut pairs = Vec::new();
    for (i, h) in host_names.iter().enumerate() {
        out += &format!(
            "[[host]]\nname = \"{h}\"\naddress = \"10.0.0.{}\"\nport = {}\n",
            i + 1,
            22 + i
        );
        if rng.gen_bool(0.8) {
            out += &format!("host_keys = [\"{}\"]\n", key(&mut rng, ""));
        }
        if rng.gen_bool(0.5) {
            out += &format!("instance_id = \"i-{h}\"\n");
        }
        let n_acc = rng.gen_range(1..=3);
        for a in ACCOUNTS.iter().take(n_acc) {
            out +=
                &format!("  [[host.account]]\n  name = \"{a}\"\n  secret = \"acs/ecs/{h}/{a}\"\n");
            pairs.push((a.to_string(), h.clone()));
        }
        out += "\n";
    }
    let n_eng = rng.gen_range(1..16);
    let mut uids: Vec<u32> = (0..n_eng).map(|i| 300_001 + i * 7).collect();
    uids.shuffle(&mut rng);
    let mut used_groups = std::collections::BTreeSet::new();
    let mut eng_names: Vec<String> = (0..n_eng).map(|i| format!("eng{i:02}")).collect();
    eng_names.shuffle(&mut rng);
    for (name, uid) in eng_names.iter().zip(&uids) {
        out += &format!("[[engineer]]\nname = \"{name}\"\nuid = {uid}\n");
        let keys: Vec<String> = (0..rng.gen_range(1..=2))
            .map(|j| format!("\"{}\"", key(&mut rng, &format!("{name}@l{j}"))))
            .collect();
        out += &format!("keys = [{}]\n", keys.join(", "));
        let groups: Vec<&str> = GROUPS
            .iter()
            .copied()
            .filter(|_| rng.gen_bool(0.3))
            .collect();
        if !groups.is_empty() {
            used_groups.extend(groups.iter().copied());
            let g: Vec<String> = groups.iter().map(|g| format!("\"{g}\"")).collect();
            out += &format!("groups = [{}]\n", g.join(", "));
        }
        out += "\n";
    }
    let used_groups: Vec<&str> = used_groups.into_iter().collect();
    for _ in 0..rng.gen_range(0..30) {
        out += "[[grant]]\n";
        let mut named = Vec::new();
        let mut groups = Vec::new();
        loop {
            for e in &eng_names {
                if rng.gen_bool(0.15) {
                    named.push(format!("\"{e}\""));
                }
            }
            for g in &used_groups {
                if rng.gen_bool(0.2) {
                    groups.push(format!("\"{g}\""));
                }
            }
            if !named.is_empty() || !groups.is_empty() {
                break;
            }
        }
        if !named.is_empty() {
            out += &format!("engineers = [{}]\n", named.join(", "));
        }
        if !groups.is_empty() {
            out += &format!("groups = [{}]\n", groups.join(", "));
        }
        let pats: Vec<String> = (0..rng.gen_range(1..=3))
            .map(|_| {
                let (a, h) = pairs.choose(&mut rng).unwrap().clone();
                let p = match rng.gen_range(0..6) {
                    0 => "*@*".to_owned(),
                    1 => format!("*@{h}"),
                    2 => format!("{a}@{}*", &h[..3]),
                    3 => format!("{}*@*-0*", &a[..1]),
                    _ => format!("{a}@{h}"),
                };
                format!("\"{p}\"")
            })
            .collect();
        out += &format!("accounts = [{}]\n", pats.join(", "));
        if rng.gen_bool(0.35) {
            let nets = [
                "\"10.0.0.0/8\"",
                "\"127.0.0.1\"",
                "\"192.168.1.0/24\"",
                "\"2001:db8::/32\"",
            ];
            let picked: Vec<&str> = nets.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
            let picked = if picked.is_empty() {
                vec![nets[0]]
            } else {
                picked
            };
            out += &format!("from = [{}]\n", picked.join(", "));
        }
        match rng.gen_range(0..6) {
            0 => out += &format!("not_before = \"{}\"\n", rfc(now + day)),
            1 => out += &format!("not_after = \"{}\"\n", rfc(now - day)),
            2 => {
                out += &format!(
                    "not_before = \"{}\"\nnot_after = \"{}\"\n",
                    rfc(now - day),
                    rfc(now + day)
                )
            }
            3 => out += &format!("not_after = \"{}\"\n", rfc(now + 2 * day)),
            _ => {}
        }
        out += "\n";
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    config: PathBuf,
    place: Place,
}

fn fixture(text: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kmsbastion.toml");
    fs::write(&config, text).unwrap();
    let owner = fs::metadata(dir.path()).unwrap().uid();
    let place = Place {
        dir: dir.path().join("index"),
        owner,
        check_ancestors: false,
        settle: Duration::ZERO,
    };
    Fixture {
        _dir: dir,
        config,
        place,
    }
}

impl Fixture {
    fn build(&self) -> Built {
        build_in(&self.place, &self.config).unwrap()
    }
    fn index_file(&self) -> PathBuf {
        self.place.file_for(&self.config)
    }
    fn scoped(&self, scope: Scope<'_>) -> Config {
        let l = load_in(&self.place, &self.config, scope).unwrap();
        assert_eq!(l.via, Via::Index, "{scope:?} must come from the index");
        l.config
    }
    fn fallback(&self) -> Unusable {
        match load_in(&self.place, &self.config, Scope::Engineers) {
            Ok(Loaded {
                via: Via::FullLoad { why, .. },
                config,
            }) => {
                assert_eq!(config, Config::load(&self.config).unwrap());
                why
            }
            other => panic!("expected a full load, got {other:?}"),
        }
    }
}

fn sources() -> Vec<Option<IpAddr>> {
    vec![
        None,
        Some("10.1.2.3".parse().unwrap()),
        Some("127.0.0.1".parse().unwrap()),
        Some("192.168.1.7".parse().unwrap()),
        Some("::ffff:10.9.9.9".parse().unwrap()),
        Some("2001:db8::1".parse().unwrap()),
        Some("172.16.0.1".parse().unwrap()),
    ]
}

#[test]
fn scoped_loads_answer_exactly_like_the_full_configuration() {
    let now = SystemTime::now();
    let mut probes = 0;
    for seed in 0..40 {
        let text = generate(seed);
        let f = fixture(&text);
        let full = match Config::load(&f.config) {
            Ok(c) => c,
            Err(e) => panic!("seed {seed}: generated config must load: {e}\n{text}"),
        };
        let built = f.build();
        assert_eq!(built.grants, full.grants.len());
        let mut engineers: Vec<String> = full.engineers.iter().map(|e| e.name.clone()).collect();
        engineers.push("nobody".into());
        let mut hosts: Vec<String> = full.hosts.iter().map(|h| h.name.clone()).collect();
        hosts.push("nohost".into());
        for e in &engineers {
            let plain = f.scoped(Scope::Engineer(e));
            for src in sources() {
                assert_eq!(
                    grant::reachable(&full, e, src, now),
                    grant::reachable(&plain, e, src, now),
                    "seed {seed}: reachable {e} {src:?}"
                );
            }
            let by_name = f.scoped(Scope::Name(e));
            assert_eq!(
                passwd::passwd_by_name(&full, e),
                passwd::passwd_by_name(&by_name, e)
            );
            assert_eq!(
                passwd::initgroups(&full, e),
                passwd::initgroups(&by_name, e)
            );
            let user = load_for_user_in(&f, e);
            assert_eq!(
                authorized_keys(&full, e, None, now),
                authorized_keys(&user, e, None, now)
            );
            for account in ACCOUNTS.iter().copied().chain(["nope"]) {
                for h in &hosts {
                    let login = LoginString {
                        engineer: e.clone(),
                        account: account.to_owned(),
                        host: h.clone(),
                    };
                    let name = login.to_string();
                    let scoped = f.scoped(Scope::Login(&login));
                    for src in sources() {
                        assert_eq!(
                            grant::evaluate(&full, &login, src, now),
                            grant::evaluate(&scoped, &login, src, now),
                            "seed {seed}: {login} from {src:?}"
                        );
                        probes += 1;
                    }
                    assert_eq!(
                        grant::key_restrictions(&full, &login, now),
                        grant::key_restrictions(&scoped, &login, now)
                    );
                    let user = load_for_user_in(&f, &name);
                    let offered = full
                        .engineer(e)
                        .and_then(|x| x.public_keys().into_iter().next());
                    let offered = offered.as_ref().map(|k| OfferedKey {
                        key_type: &k.key_type,
                        base64: &k.base64,
                    });
                    for o in [None, offered] {
                        assert_eq!(
                            authorized_keys(&full, &name, o, now),
                            authorized_keys(&user, &name, o, now),
                            "seed {seed}: keys of {name}"
                        );
                    }
                    let nss = f.scoped(Scope::Name(&name));
                    assert_eq!(
                        passwd::passwd_by_name(&full, &name),
                        passwd::passwd_by_name(&nss, &name)
                    );
                }
            }
        }
        for uid in full.engineers.iter().map(|e| e.uid).chain([0, 1, 399_999]) {
            let scoped = f.scoped(Scope::Uid(uid));
            assert_eq!(
                passwd::passwd_by_uid(&full, uid),
                passwd::passwd_by_uid(&scoped, uid)
            );
        }
        let all = f.scoped(Scope::Engineers);
        assert_eq!(passwd::passwd_all(&full), passwd::passwd_all(&all));
        assert_eq!(passwd::group_all(&full), passwd::group_all(&all));
        for gid in [full.bastion.gid, 1] {
            assert_eq!(
                passwd::group_by_gid(&full, gid),
                passwd::group_by_gid(&all, gid)
            );
        }
        assert_eq!(
            passwd::group_by_name(&full, "kmsbidx-test"),
            passwd::group_by_name(&all, "kmsbidx-test")
        );
        // Garbage names resolve to nothing, as on the full configuration.
        for junk in ["", "@@", "a@b", "x@y@z@w", "ROOT", "root"] {
            let s = f.scoped(Scope::Name(junk));
            assert_eq!(
                passwd::passwd_by_name(&full, junk),
                passwd::passwd_by_name(&s, junk)
            );
        }
    }
    assert!(probes > 10_000, "only {probes} probes");
}

fn load_for_user_in(f: &Fixture, user: &str) -> Config {
    match Login::parse(user) {
        Ok(Login::Composite(l)) => f.scoped(Scope::Login(&l)),
        _ => f.scoped(Scope::Name(user)),
    }
}

#[test]
fn the_full_scope_decodes_to_the_loaded_configuration() {
    for seed in [3, 11, 29] {
        let f = fixture(&generate(seed));
        f.build();
        let ix = Index::open_in(&f.place, &f.config).unwrap();
        let decoded = ix.scoped(&f.config, Scope::Full).unwrap();
        let full = Config::load(&f.config).unwrap();
        assert_eq!(
            (
                decoded.kms,
                decoded.bastion,
                decoded.hosts,
                decoded.engineers,
                decoded.grants
            ),
            (
                full.kms,
                full.bastion,
                full.hosts,
                full.engineers,
                full.grants
            )
        );
    }
}

#[test]
fn rule_numbers_and_lines_are_those_of_the_file() {
    let f = fixture(&generate(7));
    f.build();
    let full = Config::load(&f.config).unwrap();
    for e in &full.engineers {
        let scoped = f.scoped(Scope::Engineer(&e.name));
        for (i, rule) in scoped.grants.iter().enumerate() {
            assert_eq!(rule.line, full.grants[i].line);
            if rule.applies_to(e) {
                assert_eq!(rule, &full.grants[i]);
            } else {
                assert!(!rule.applies_to_anyone() && rule.accounts.is_empty());
                assert!(!full.grants[i].applies_to(e));
            }
        }
        let applying = full.grants.iter().filter(|g| g.applies_to(e)).count();
        assert_eq!(
            scoped.grants.iter().filter(|g| g.applies_to(e)).count(),
            applying
        );
    }
}

/// Every scope a helper uses, for every engineer, host and a few accounts and sources:
/// through `load_in` (index or fallback, whichever it takes) the answers equal the full
/// configuration's.
fn assert_answers_like_full(f: &Fixture, full: &Config, what: &str) {
    let now = SystemTime::now();
    let load = |scope: Scope<'_>| load_in(&f.place, &f.config, scope).unwrap().config;
    for e in full
        .engineers
        .iter()
        .map(|e| e.name.as_str())
        .chain(["nobody"])
    {
        let plain = load(Scope::Engineer(e));
        assert_eq!(
            grant::reachable(full, e, None, now),
            grant::reachable(&plain, e, None, now),
            "{what}: reachable {e}"
        );
        let nss = load(Scope::Name(e));
        assert_eq!(
            passwd::passwd_by_name(full, e),
            passwd::passwd_by_name(&nss, e),
            "{what}"
        );
        for h in full.hosts.iter().map(|h| h.name.as_str()).chain(["nohost"]) {
            for account in ["root", "deploy"] {
                let login = LoginString {
                    engineer: e.to_owned(),
                    account: account.to_owned(),
                    host: h.to_owned(),
                };
                let scoped = load(Scope::Login(&login));
                for src in [None, Some("10.1.2.3".parse().unwrap())] {
                    assert_eq!(
                        grant::evaluate(full, &login, src, now),
                        grant::evaluate(&scoped, &login, src, now),
                        "{what}: {login} from {src:?}"
                    );
                }
                let name = login.to_string();
                assert_eq!(
                    authorized_keys(full, &name, None, now),
                    authorized_keys(&scoped, &name, None, now),
                    "{what}: keys of {name}"
                );
            }
        }
    }
    for uid in full.engineers.iter().map(|e| e.uid) {
        let scoped = load(Scope::Uid(uid));
        assert_eq!(
            passwd::passwd_by_uid(full, uid),
            passwd::passwd_by_uid(&scoped, uid),
            "{what}"
        );
    }
    let all = load(Scope::Engineers);
    assert_eq!(passwd::group_all(full), passwd::group_all(&all), "{what}");
    assert_eq!(passwd::passwd_all(full), passwd::passwd_all(&all), "{what}");
}

#[test]
fn every_truncation_and_bit_flip_falls_back_or_answers_correctly() {
    let f = fixture(&generate(5));
    f.build();
    let full = Config::load(&f.config).unwrap();
    let good = fs::read(f.index_file()).unwrap();
    assert!(Index::open_in(&f.place, &f.config).is_ok());
    let write = |bytes: &[u8]| {
        // A new file each time: rename keeps the owner and mode checks realistic.
        let tmp = f.place.dir.join("tmp");
        fs::write(&tmp, bytes).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        fs::rename(&tmp, f.index_file()).unwrap();
    };
    let mut rng = StdRng::seed_from_u64(1);
    let mut cuts: Vec<usize> = (0..HEADER_LEN + 40).collect();
    cuts.extend((0..100).map(|_| rng.gen_range(0..good.len())));
    for cut in cuts {
        write(&good[..cut]);
        assert!(
            matches!(f.fallback(), Unusable::Corrupt(_)),
            "truncated at {cut}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    write(&longer);
    assert!(matches!(f.fallback(), Unusable::Corrupt(_)));

    // Header and directory: the index is refused as a whole.
    let dir_end = HEADER_LEN + Header::decode(&good).unwrap().dir_len as usize;
    let mut positions: Vec<usize> = (0..HEADER_LEN).collect();
    positions.extend((0..100).map(|_| rng.gen_range(HEADER_LEN..dir_end)));
    for pos in positions {
        let mut bad = good.clone();
        bad[pos] ^= 1 << rng.gen_range(0..8);
        write(&bad);
        let why = f.fallback();
        assert!(
            matches!(why, Unusable::Corrupt(_) | Unusable::Stale),
            "flip at {pos}: {why:?}"
        );
    }
    // Records: each is checked when read; whatever is read answers like the full file.
    for _ in 0..60 {
        let pos = rng.gen_range(dir_end..good.len());
        let mut bad = good.clone();
        bad[pos] ^= 1 << rng.gen_range(0..8);
        write(&bad);
        assert!(Index::open_in(&f.place, &f.config).is_ok());
        assert_answers_like_full(&f, &full, &format!("flip at {pos}"));
    }
    write(&good);
    assert!(Index::open_in(&f.place, &f.config).is_ok());
    assert_answers_like_full(&f, &full, "restored");
}

/// Records that are random bytes: decoding must stay total.
struct Garbage(std::cell::RefCell<StdRng>);

impl Records for Garbage {
    fn read(&self, _off: usize, len: usize) -> Result<Vec<u8>, Unusable> {
        let mut rng = self.0.borrow_mut();
        let n = rng.gen_range(0..len.clamp(1, 4096));
        Ok((0..n).map(|_| rng.gen()).collect())
    }
}

#[test]
fn damaged_directories_and_records_never_panic_or_grant_more() {
    // Decoding is total even for a directory that passed its checksum and for records that
    // are garbage (the checksums are not what keeps a hostile file out: its owner is).
    let f = fixture(&generate(9));
    f.build();
    let good = fs::read(f.index_file()).unwrap();
    let header = Header::decode(&good).unwrap();
    let dir_end = HEADER_LEN + header.dir_len as usize;
    let records = MemRecords(&good[dir_end..]);
    let mut rng = StdRng::seed_from_u64(2);
    let full = Config::load(&f.config).unwrap();
    let probe = |body: &Body<'_>| {
        for e in &full.engineers {
            if let Ok(c) = body.scoped(&f.config, Scope::Engineer(&e.name)) {
                for g in &c.grants {
                    assert!(!g.applies_to_anyone() || c.engineers.iter().any(|x| g.applies_to(x)));
                }
            }
            let _ = body.scoped(&f.config, Scope::Uid(e.uid));
            let _ = body.scoped(&f.config, Scope::Name(&e.name));
        }
        let _ = body.scoped(&f.config, Scope::Engineers);
        let _ = body.scoped(&f.config, Scope::Full);
    };
    for _ in 0..300 {
        let mut dir = good[HEADER_LEN..dir_end].to_vec();
        for _ in 0..rng.gen_range(1..4) {
            let pos = rng.gen_range(0..dir.len());
            dir[pos] = rng.gen();
        }
        if let Ok(body) = Body::parse(&dir, &records) {
            probe(&body);
        }
    }
    let garbage = Garbage(std::cell::RefCell::new(StdRng::seed_from_u64(3)));
    let dir = &good[HEADER_LEN..dir_end];
    let body = Body::parse(dir, &garbage).unwrap();
    for _ in 0..20 {
        probe(&body);
    }
}

#[test]
fn a_changed_input_makes_the_index_stale() {
    let text = generate(4);
    let f = fixture(&text);
    f.build();
    assert!(Index::open_in(&f.place, &f.config).is_ok());
    // Same bytes, new inode and times.
    let tmp = f.config.with_extension("new");
    fs::write(&tmp, &text).unwrap();
    fs::rename(&tmp, &f.config).unwrap();
    assert_eq!(f.fallback(), Unusable::Stale);
    f.build();
    assert!(Index::open_in(&f.place, &f.config).is_ok());
    // An in-place edit.
    fs::write(&f.config, format!("{text}\n# edited\n")).unwrap();
    assert_eq!(f.fallback(), Unusable::Stale);
    // A broken configuration: no index, the loader's error, and the old index is removed.
    fs::write(&f.config, format!("{text}\nbogus = 1\n")).unwrap();
    assert!(matches!(
        build_in(&f.place, &f.config),
        Err(IndexError::Config(_))
    ));
    assert!(!f.index_file().exists());
    assert!(load_in(&f.place, &f.config, Scope::Engineers).is_err());
}

#[test]
fn wrong_owner_mode_type_or_directory_falls_back() {
    let f = fixture(&generate(6));
    f.build();
    let file = f.index_file();
    fs::set_permissions(&file, fs::Permissions::from_mode(0o664)).unwrap();
    assert!(matches!(f.fallback(), Unusable::Insecure(_)));
    fs::set_permissions(&file, fs::Permissions::from_mode(0o646)).unwrap();
    assert!(matches!(f.fallback(), Unusable::Insecure(_)));
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    assert!(Index::open_in(&f.place, &f.config).is_ok());

    let other_owner = Place {
        owner: f.place.owner.wrapping_add(1),
        ..f.place.clone()
    };
    assert!(matches!(
        Index::open_in(&other_owner, &f.config),
        Err(Unusable::Insecure(_))
    ));
    assert!(matches!(
        build_in(&other_owner, &f.config),
        Err(IndexError::Io(_))
    ));

    fs::set_permissions(&f.place.dir, fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(f.fallback(), Unusable::Insecure(_)));
    fs::set_permissions(&f.place.dir, fs::Permissions::from_mode(0o755)).unwrap();

    // A symbolic link to a perfectly good index is not followed.
    let real = f.place.dir.join("real.idx");
    fs::rename(&file, &real).unwrap();
    std::os::unix::fs::symlink(&real, &file).unwrap();
    assert!(matches!(f.fallback(), Unusable::Insecure(_)));
    fs::remove_file(&file).unwrap();
    assert_eq!(f.fallback(), Unusable::Missing);
    fs::create_dir(&file).unwrap();
    assert!(matches!(
        f.fallback(),
        Unusable::Unreadable(_) | Unusable::Insecure(_)
    ));
}

#[test]
fn refresh_writes_the_index_from_the_full_load_without_parsing_again() {
    let f = fixture(&generate(8));
    let first = load_in(&f.place, &f.config, Scope::Engineers).unwrap();
    assert!(matches!(
        first.via,
        Via::FullLoad {
            why: Unusable::Missing,
            ..
        }
    ));
    let Via::FullLoad {
        snapshot: Some(s), ..
    } = &first.via
    else {
        panic!("a full load records its snapshot");
    };
    write_in(&f.place, &f.config, &first.config, s).unwrap();
    let second = load_in(&f.place, &f.config, Scope::Engineers).unwrap();
    assert_eq!(second.via, Via::Index);
    // A snapshot taken before a change is refused.
    fs::write(&f.config, generate(8) + "\n").unwrap();
    assert!(matches!(
        write_in(&f.place, &f.config, &first.config, s),
        Err(IndexError::Unsettled)
    ));
}

#[test]
fn inputs_changed_moments_ago_are_not_indexed() {
    let f = fixture(&generate(2));
    let s = Snapshot::take(&f.config).unwrap();
    assert!(!s.settled(), "the file was written just now");
    let strict = Place {
        settle: SETTLE_TIME,
        ..f.place.clone()
    };
    let cfg = Config::load(&f.config).unwrap();
    assert!(matches!(
        write_in(&strict, &f.config, &cfg, &s),
        Err(IndexError::Unsettled)
    ));
    // `build` waits for the inputs to settle instead.
    build_in(&strict, &f.config).unwrap();
    assert!(Index::open_in(&strict, &f.config).is_ok());
    std::thread::sleep(SETTLE_TIME);
    assert!(Snapshot::take(&f.config).unwrap().settled());
}

#[test]
fn the_file_name_depends_on_the_absolute_path_only() {
    let a = file_name(Path::new("/etc/kmsbastion/kmsbastion.toml"));
    assert_eq!(a.len(), 16 + 4);
    assert!(a.ends_with(".idx"));
    assert_ne!(a, file_name(Path::new("/etc/kmsbastion/other.toml")));
    assert_eq!(
        index_path(Path::new("/etc/kmsbastion/kmsbastion.toml")),
        Path::new(INDEX_DIR).join(a)
    );
}

#[test]
fn xxh64_known_answers() {
    let v: &[(u64, &str, u64)] = &[
        (0, "", 0xef46db3751d8e999),
        (0, "a", 0xd24ec4f1a98c6e5b),
        (0, "abc", 0x44bc2cf5ad770999),
        (0, "1234", 0xd8316e61d84f6ba4),
        (0, "12345678", 0xd2d02f08cf7cfd4a),
        (0, "123456789012345", 0xc377d78ade001a3c),
        (0, "1234567890123456", 0xb61c33dc6c59f270),
        (0, "1234567890123456789012345678901", 0x8f367cb873a5376e),
        (0, "12345678901234567890123456789012", 0x40fd1aa52d98274c),
        (
            0,
            "The quick brown fox jumps over the lazy dog",
            0x0b242d361fda71bc,
        ),
        (5381, "", 0xaf382146d5c3cacf),
        (5381, "abc", 0x19d1c1b5c673451f),
        (5381, "12345678901234567890123456789012", 0x38ea26e7c55f8095),
    ];
    for &(seed, data, want) in v {
        assert_eq!(xxh64(data.as_bytes(), seed), want, "{data:?} seed {seed}");
    }
}
