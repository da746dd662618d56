//! The sshd side of `enable`: the drop-in, the `Include` check, and reading `sshd -T`.
#![forbid(unsafe_code)]

/// sshd's main configuration file.
pub const MAIN_CONFIG: &str = "/etc/ssh/sshd_config";

/// Where the drop-in is installed. sshd keeps the FIRST value it reads for most keywords and
/// `Include` expands `*.conf` in lexical order, so `00-` sorts before distribution and cloud
/// drop-ins such as `50-cloud-init.conf` or `50-redhat.conf`.
pub const DROP_IN_PATH: &str = "/etc/ssh/sshd_config.d/00-kmsbastion.conf";

/// The drop-in `enable` installs, byte for byte as shipped in `packaging/sshd_config.d/`.
pub const DROP_IN: &str = include_str!("../../packaging/sshd_config.d/kmsbastion.conf");

/// The `MaxStartups` the drop-in sets for bursts of bastion logins (its only global line).
pub const MAX_STARTUPS: &str = "100:30:200";

/// OpenSSH's compiled-in `MaxStartups` (servconf.c `fill_default_server_options`), what sshd
/// uses when no file sets one.
pub const OPENSSH_DEFAULT_MAX_STARTUPS: &str = "10:30:100";

/// What replaces the drop-in's `MaxStartups` line when the administrator's value is kept: a
/// comment, so the installed file still explains itself.
const MAX_STARTUPS_LEFT_OUT: &str =
    "# MaxStartups 100:30:200: left out by `kmsbastion enable`, which keeps the \
                                     administrator's MaxStartups";

/// The drop-in as `enable` installs it: [`DROP_IN`] byte for byte, or, without
/// `max_startups`, with its `MaxStartups` line turned into a comment (everything else,
/// line endings included, unchanged).
pub fn drop_in(max_startups: bool) -> String {
    if max_startups {
        return DROP_IN.to_string();
    }
    DROP_IN
        .split_inclusive('\n')
        .map(|line| match directive(line) {
            Some(d) if d.keyword == "maxstartups" => {
                let body = line.trim_end_matches(['\r', '\n']).len();
                format!("{MAX_STARTUPS_LEFT_OUT}{}", line.get(body..).unwrap_or(""))
            }
            _ => line.to_string(),
        })
        .collect()
}

/// One `MaxStartups` line sshd read, as its parser reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingSource {
    /// The file, as sshd names it (a target path).
    pub file: String,
    /// The line number in that file.
    pub line: u32,
    /// The value as written.
    pub value: String,
}

impl std::fmt::Display for SettingSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {}", self.file, self.line)
    }
}

/// Every line that sets `keyword`, in the order sshd read them, from the debug output of
/// `sshd -T -ddd`: its parser logs `debug3: FILE:LINE setting Keyword value` for each
/// directive it applies (servconf.c, unchanged since OpenSSH 4.4). This is sshd's own
/// account of its `Include` expansion, so nothing about globs, include order or nesting has
/// to be re-implemented here. A line read twice (`-C` re-parses) is listed once.
pub fn setting_sources(debug: &str, keyword: &str) -> Vec<SettingSource> {
    let mut found: Vec<SettingSource> = Vec::new();
    for line in debug.lines() {
        let Some(rest) = line.trim_start().strip_prefix("debug3: ") else {
            continue;
        };
        let Some((place, setting)) = rest.split_once(" setting ") else {
            continue;
        };
        let Some((file, number)) = place.rsplit_once(':') else {
            continue;
        };
        let Ok(number) = number.parse::<u32>() else {
            continue;
        };
        let mut words = setting.split(|c: char| c.is_whitespace() || c == '=');
        if !words
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
        {
            continue;
        }
        let value = words.find(|w| !w.is_empty()).unwrap_or("").to_string();
        let source = SettingSource {
            file: file.to_string(),
            line: number,
            value,
        };
        if !found.contains(&source) {
            found.push(source);
        }
    }
    found
}

/// The value of `keyword` in an `sshd -T` dump.
pub fn dump_value<'a>(dump: &'a [Directive], keyword: &str) -> Option<&'a str> {
    dump.iter()
        .find(|d| d.keyword == keyword)
        .map(|d| d.value.as_str())
}

/// An `sshd -T` dump without the lines of `keyword` (for comparing everything else).
pub fn dump_without(dump: &str, keyword: &str) -> String {
    dump.split_inclusive('\n')
        .filter(|line| directive(line).is_none_or(|d| d.keyword != keyword))
        .collect()
}

/// Whether the drop-in sets `MaxStartups`, and why not when it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaxStartupsChoice {
    /// Install the drop-in with [`MAX_STARTUPS`].
    Ours,
    /// Leave the line out: sshd's value stays the administrator's.
    Theirs {
        /// The value kept, for people (`50:30:100`, or several if files disagree).
        value: String,
        /// What `sshd -T` may show afterwards (empty: sshd's built-in default, which is not
        /// known in advance).
        expected: Vec<String>,
        /// Where the value comes from: `/etc/ssh/sshd_config line 40`, `--keep-max-startups`.
        reason: String,
    },
}

/// Decides whether `enable` may set `MaxStartups`: never over a value the administrator
/// chose. `sources` are the `MaxStartups` lines sshd reads now (see [`setting_sources`]);
/// those in our own drop-in (left by a previous `enable`) do not count. `effective` is what
/// `sshd -T` shows now; `ours_installed` says whether the drop-in in place sets it.
///
/// The administrator chose when another file sets it (even to OpenSSH's default: an explicit
/// line is a decision, and from OpenSSH 10.1 on our `00-` drop-in would override it), or
/// when, with no line in our drop-in, sshd's value is not OpenSSH's default although no file
/// sets it (a distribution's patched default). `keep` (`--keep-max-startups`) always keeps.
pub fn choose_max_startups(
    keep: bool,
    effective: Option<&str>,
    ours_installed: bool,
    sources: &[SettingSource],
) -> MaxStartupsChoice {
    let theirs: Vec<&SettingSource> = sources.iter().filter(|s| s.file != DROP_IN_PATH).collect();
    if !theirs.is_empty() {
        let mut expected: Vec<String> = Vec::new();
        for s in &theirs {
            if !expected.contains(&s.value) {
                expected.push(s.value.clone());
            }
        }
        let reason = theirs
            .iter()
            .map(|s| {
                if expected.len() > 1 {
                    format!("{} in {s}", s.value)
                } else {
                    s.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        return MaxStartupsChoice::Theirs {
            value: expected.join(" / "),
            expected,
            reason,
        };
    }
    let before = effective.filter(|_| !ours_installed);
    match before {
        Some(value) if value != OPENSSH_DEFAULT_MAX_STARTUPS => MaxStartupsChoice::Theirs {
            value: value.to_string(),
            expected: vec![value.to_string()],
            reason: format!(
                "sshd's own default here, not OpenSSH's {OPENSSH_DEFAULT_MAX_STARTUPS}; no \
                 configuration file sets it"
            ),
        },
        _ if keep => MaxStartupsChoice::Theirs {
            value: before.unwrap_or("(sshd's default)").to_string(),
            expected: before.map(str::to_string).into_iter().collect(),
            reason: "--keep-max-startups".to_string(),
        },
        _ => MaxStartupsChoice::Ours,
    }
}

/// One `Keyword value` line of an sshd configuration, keyword lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Lower-case keyword, as `sshd -T` prints it.
    pub keyword: String,
    /// The value with runs of blanks collapsed to one space.
    pub value: String,
}

impl std::fmt::Display for Directive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.keyword, self.value)
    }
}

/// The directives of a configuration text, split into those before the first `Match`
/// (global) and those inside `Match` blocks.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Directives that apply to every connection.
    pub global: Vec<Directive>,
    /// `Match` criteria lines (the text after `Match`).
    pub matches: Vec<String>,
    /// Directives inside `Match` blocks.
    pub conditional: Vec<Directive>,
}

/// Splits an sshd configuration into directives; comments and blank lines are skipped and
/// `Keyword=value` is accepted as sshd does.
pub fn parse(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let mut in_match = false;
    for line in text.lines() {
        let Some(d) = directive(line) else { continue };
        if d.keyword == "match" {
            in_match = !d.value.eq_ignore_ascii_case("all");
            parsed.matches.push(d.value);
            continue;
        }
        if in_match {
            parsed.conditional.push(d);
        } else {
            parsed.global.push(d);
        }
    }
    parsed
}

fn directive(line: &str) -> Option<Directive> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let split = line
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(line.len());
    let keyword = line.get(..split)?.to_ascii_lowercase();
    let rest = line.get(split..).unwrap_or("").trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest);
    let value = rest.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(Directive { keyword, value })
}

/// True when the main configuration includes `DROP_IN_PATH` unconditionally (an `Include`
/// before the first `Match` whose glob matches it). Relative `Include` paths are relative
/// to `/etc/ssh`, as in sshd.
pub fn includes_drop_in(main_config: &str) -> bool {
    for d in parse_until_match(main_config) {
        if d.keyword != "include" {
            continue;
        }
        for pattern in d.value.split(' ') {
            let pattern = pattern.trim_matches('"');
            let absolute = if pattern.starts_with('/') {
                pattern.to_string()
            } else {
                format!("/etc/ssh/{pattern}")
            };
            if glob_match(&absolute, DROP_IN_PATH) {
                return true;
            }
        }
    }
    false
}

fn parse_until_match(text: &str) -> Vec<Directive> {
    text.lines()
        .filter_map(directive)
        .take_while(|d| d.keyword != "match")
        .collect()
}

/// `fnmatch(3)` with `FNM_PATHNAME` for `*` and `?` (what `glob(3)` does per component).
fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                backtrack = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if (c == '?' && t.get(ti) != Some(&'/')) || Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match backtrack {
                Some((bp, bt)) if t.get(bt) != Some(&'/') => {
                    backtrack = Some((bp, bt + 1));
                    pi = bp + 1;
                    ti = bt + 1;
                }
                _ => return false,
            },
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|c| *c == '*')
}

/// The `keyword value` lines of `sshd -T` output.
pub fn parse_dump(output: &str) -> Vec<Directive> {
    output.lines().filter_map(directive).collect()
}

/// The expected settings that an `sshd -T` dump lacks, compared as sshd prints them
/// (`yes`/`no` case-insensitively).
pub fn missing_settings(dump: &[Directive], expected: &[Directive]) -> Vec<Directive> {
    expected
        .iter()
        .filter(|want| {
            !dump.iter().any(|got| {
                got.keyword == want.keyword
                    && (got.value == want.value || got.value.eq_ignore_ascii_case(&want.value))
            })
        })
        .cloned()
        .collect()
}

/// The programs a configuration runs (`AuthorizedKeysCommand`, `ForceCommand`): they must
/// exist before sshd is pointed at them.
pub fn programs(parsed: &Parsed) -> Vec<String> {
    parsed
        .global
        .iter()
        .chain(parsed.conditional.iter())
        .filter(|d| d.keyword == "authorizedkeyscommand" || d.keyword == "forcecommand")
        .filter_map(|d| d.value.split(' ').next().map(str::to_string))
        .filter(|p| p.starts_with('/'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_drop_in_sets_only_max_startups_outside_its_match_block() {
        let parsed = parse(DROP_IN);
        assert_eq!(
            parsed.global,
            vec![Directive {
                keyword: "maxstartups".into(),
                value: MAX_STARTUPS.into()
            }],
            "the only global setting is the pre-authentication throttle"
        );
        assert!(!parsed.matches.is_empty());
        assert!(parsed
            .conditional
            .iter()
            .any(|d| d.keyword == "forcecommand"));
        assert!(programs(&parsed)
            .iter()
            .all(|p| p.starts_with("/usr/libexec/kmsbastion/")));
    }

    #[test]
    fn include_detection_follows_sshd_rules() {
        assert!(includes_drop_in(
            "Include /etc/ssh/sshd_config.d/*.conf\nPort 22\n"
        ));
        assert!(includes_drop_in("include sshd_config.d/*.conf\n"));
        assert!(includes_drop_in(
            "Include=/etc/ssh/sshd_config.d/0*.conf /x\n"
        ));
        assert!(!includes_drop_in(
            "#Include /etc/ssh/sshd_config.d/*.conf\n"
        ));
        assert!(!includes_drop_in("Include /etc/ssh/other.d/*.conf\n"));
        assert!(
            !includes_drop_in("Include /etc/ssh/*.conf\n"),
            "* must not cross /"
        );
        assert!(!includes_drop_in(
            "Match User x\nInclude /etc/ssh/sshd_config.d/*.conf\n"
        ));
    }

    #[test]
    fn missing_settings_compares_as_sshd_prints() {
        let dump = parse_dump("permittty yes\nforcecommand /usr/libexec/x  -a\n");
        let expected = parse(
            "Match Group g\n  PermitTTY Yes\n  ForceCommand /usr/libexec/x -a\n  PermitUserRC no\n",
        )
        .conditional;
        assert_eq!(
            missing_settings(&dump, &expected),
            vec![Directive {
                keyword: "permituserrc".into(),
                value: "no".into()
            }]
        );
    }

    #[test]
    fn without_max_startups_the_drop_in_differs_only_in_that_line() {
        let kept = drop_in(false);
        assert!(parse(&kept).global.is_empty(), "{kept}");
        assert_eq!(parse(&kept).conditional, parse(DROP_IN).conditional);
        assert_eq!(kept.lines().count(), DROP_IN.lines().count());
        let changed: Vec<(&str, &str)> = DROP_IN
            .lines()
            .zip(kept.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert_eq!(changed[0].0, format!("MaxStartups {MAX_STARTUPS}"));
        assert!(changed[0]
            .1
            .starts_with("# MaxStartups 100:30:200: left out"));
        assert_eq!(drop_in(true), DROP_IN);
        assert_eq!(
            drop_in(false).len() - DROP_IN.len(),
            MAX_STARTUPS_LEFT_OUT.len() - "MaxStartups 100:30:200".len()
        );
    }

    /// `sshd -T -ddd -C user=root,...` of OpenSSH 9.2 (Debian 12), trimmed.
    const TRACE: &str = "debug2: load_server_config: filename /etc/ssh/sshd_config
debug2: /etc/ssh/sshd_config line 12: new include /etc/ssh/sshd_config.d/*.conf
debug3: /etc/ssh/sshd_config.d/00-kmsbastion.conf:20 setting MaxStartups 100:30:200
debug3: /etc/ssh/sshd_config.d/10-y.conf:1 setting maxstartups=50:30:60
debug3: /etc/ssh/sshd_config:62 setting KbdInteractiveAuthentication no
debug3: /etc/ssh/sshd_config:115 setting Subsystem sftp\t/usr/lib/openssh/sftp-server
debug3: /etc/ssh/sshd_config:120 setting MaxStartupsX 1
debug3: /etc/ssh/sshd_config.d/10-y.conf:1 setting maxstartups=50:30:60
debug3: checking match for 'Group kmsbastion-engineers' user root host x addr 127.0.0.1
";

    #[test]
    fn setting_sources_reads_sshds_own_trace() {
        let found = setting_sources(TRACE, "MaxStartups");
        assert_eq!(
            found,
            vec![
                SettingSource {
                    file: DROP_IN_PATH.into(),
                    line: 20,
                    value: "100:30:200".into()
                },
                SettingSource {
                    file: "/etc/ssh/sshd_config.d/10-y.conf".into(),
                    line: 1,
                    value: "50:30:60".into()
                },
            ]
        );
        assert!(setting_sources(TRACE, "PermitTTY").is_empty());
    }

    fn source(file: &str, line: u32, value: &str) -> SettingSource {
        SettingSource {
            file: file.into(),
            line,
            value: value.into(),
        }
    }

    #[test]
    fn max_startups_is_ours_only_where_nobody_chose_one() {
        let ours = source(DROP_IN_PATH, 20, MAX_STARTUPS);
        let main = source(MAIN_CONFIG, 40, "50:30:100");
        // Nothing set: ours, also on a re-run where only our own line is there.
        assert_eq!(
            choose_max_startups(false, Some("10:30:100"), false, &[]),
            MaxStartupsChoice::Ours
        );
        assert_eq!(
            choose_max_startups(false, Some(MAX_STARTUPS), true, std::slice::from_ref(&ours)),
            MaxStartupsChoice::Ours
        );
        // A line elsewhere, whatever sshd shows now (ours may win on 10.1+).
        for effective in ["50:30:100", MAX_STARTUPS] {
            assert_eq!(
                choose_max_startups(false, Some(effective), true, &[ours.clone(), main.clone()]),
                MaxStartupsChoice::Theirs {
                    value: "50:30:100".into(),
                    expected: vec!["50:30:100".into()],
                    reason: "/etc/ssh/sshd_config line 40".into()
                }
            );
        }
        // Even the default, written out, is a choice.
        let explicit = source("/etc/ssh/sshd_config.d/50-site.conf", 3, "10:30:100");
        assert!(matches!(
            choose_max_startups(false, Some("10:30:100"), false, &[explicit]),
            MaxStartupsChoice::Theirs { value, .. } if value == "10:30:100"
        ));
        // Two files disagreeing: both named, either may show.
        let other = source("/etc/ssh/sshd_config.d/50-site.conf", 3, "20:30:60");
        match choose_max_startups(false, None, false, &[main.clone(), other]) {
            MaxStartupsChoice::Theirs {
                value,
                expected,
                reason,
            } => {
                assert_eq!(value, "50:30:100 / 20:30:60");
                assert_eq!(expected.len(), 2);
                assert!(reason.contains("20:30:60 in /etc/ssh/sshd_config.d/50-site.conf line 3"));
            }
            other => panic!("{other:?}"),
        }
        // A patched default without any line.
        assert!(matches!(
            choose_max_startups(false, Some("30:30:100"), false, &[]),
            MaxStartupsChoice::Theirs { value, reason, .. }
                if value == "30:30:100" && reason.contains("no configuration file sets it")
        ));
        // --keep-max-startups.
        assert_eq!(
            choose_max_startups(true, Some("10:30:100"), false, &[]),
            MaxStartupsChoice::Theirs {
                value: "10:30:100".into(),
                expected: vec!["10:30:100".into()],
                reason: "--keep-max-startups".into()
            }
        );
        assert!(matches!(
            choose_max_startups(true, Some(MAX_STARTUPS), true, &[ours]),
            MaxStartupsChoice::Theirs { expected, .. } if expected.is_empty()
        ));
    }

    #[test]
    fn dump_helpers() {
        let dump = "port 22\nmaxstartups 10:30:100\npermittty yes\n";
        assert_eq!(
            dump_value(&parse_dump(dump), "maxstartups"),
            Some("10:30:100")
        );
        assert_eq!(
            dump_without(dump, "maxstartups"),
            "port 22\npermittty yes\n"
        );
    }
}
