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
    fn the_shipped_drop_in_changes_nothing_outside_its_match_block() {
        let parsed = parse(DROP_IN);
        assert!(
            parsed.global.is_empty(),
            "global settings in the drop-in: {:?}",
            parsed.global
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
}
