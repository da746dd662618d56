//! Login strings: the SSH user name `engineer@account@host`, or a plain `engineer`.
//!
//! The OpenSSH client splits `user@host` at the last `@`, so `ssh alice@root@web-01@jump`
//! sends the user name `alice@root@web-01`; sshd cuts user names at the first `:`, so `:` can
//! never be a separator. Every part follows a narrow grammar so that a login string can be put
//! into a passwd entry, a log line or an argv without quoting:
//!
//! * engineer and account: POSIX-style user names, `[a-z_][a-z0-9_.-]*`, at most
//!   [`MAX_USER_NAME_LEN`] bytes;
//! * host: an inventory name, `[A-Za-z0-9][A-Za-z0-9.-]*`, at most [`MAX_HOST_NAME_LEN`] bytes;
//! * no part contains `..`; the whole string is at most [`MAX_LOGIN_LEN`] bytes.
#![forbid(unsafe_code)]

use std::fmt;

/// Longest engineer or account name accepted (the traditional utmp/POSIX user name limit).
pub const MAX_USER_NAME_LEN: usize = 32;
/// Longest inventory host name accepted (one DNS label's worth).
pub const MAX_HOST_NAME_LEN: usize = 63;
/// Longest complete login string accepted.
pub const MAX_LOGIN_LEN: usize = 128;

/// A parsed SSH user name on the jump host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Login {
    /// `alice`: the engineer logs in to list what they may reach.
    Plain(String),
    /// `alice@root@web-01`: the engineer asks for an onward connection.
    Composite(LoginString),
}

/// `engineer@account@host`, every part checked against the login grammar by
/// [`Login::parse`] / [`LoginString::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoginString {
    /// The engineer (a `[[engineer]]` name).
    pub engineer: String,
    /// The target OS account (a `[[host.account]]` name).
    pub account: String,
    /// The inventory host name (a `[[host]]` name), never a free address.
    pub host: String,
}

/// Which part of a login string a [`LoginError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginPart {
    /// The engineer name.
    Engineer,
    /// The target account name.
    Account,
    /// The inventory host name.
    Host,
    /// The string as a whole.
    Whole,
}

impl fmt::Display for LoginPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoginPart::Engineer => "engineer name",
            LoginPart::Account => "account name",
            LoginPart::Host => "host name",
            LoginPart::Whole => "login",
        })
    }
}

/// Why a string is not a valid login (or not a valid name inside one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Nothing at all, or an empty part (`alice@@web-01`, `@root@web-01`).
    #[error("empty {0}")]
    Empty(LoginPart),
    /// Longer than the part's or the whole string's limit.
    #[error("{part} is longer than {max} bytes")]
    TooLong {
        /// which part
        part: LoginPart,
        /// the limit
        max: usize,
    },
    /// Two or more than three `@`-separated parts.
    #[error("a login is `engineer` or `engineer@account@host` (found {0} '@')")]
    WrongShape(usize),
    /// `:` is where sshd cuts user names (`user:style`), so it can never be a separator.
    #[error("':' is not allowed in a login")]
    Colon,
    /// Spaces, tabs, newlines.
    #[error("whitespace is not allowed in a login")]
    Whitespace,
    /// NUL and other control characters.
    #[error("control characters are not allowed in a login")]
    Control,
    /// Anything outside ASCII.
    #[error("non-ASCII characters are not allowed in a login")]
    NonAscii,
    /// `..` anywhere (path traversal shapes are never names).
    #[error("'..' is not allowed in the {0}")]
    DotDot(LoginPart),
    /// A name that must not start with this character (`-`, `.`, a digit for user names).
    #[error("{part} must not start with '{ch}'")]
    BadStart {
        /// which part
        part: LoginPart,
        /// the offending first character
        ch: char,
    },
    /// A character outside the part's grammar (`/`, `%`, `*`, uppercase in user names, …).
    #[error("'{ch}' is not allowed in the {part}")]
    BadChar {
        /// which part
        part: LoginPart,
        /// the offending character
        ch: char,
    },
}

impl Login {
    /// Parses an SSH user name. Never panics; every rejection says why.
    pub fn parse(s: &str) -> Result<Login, LoginError> {
        check_whole(s)?;
        let parts: Vec<&str> = s.split('@').collect();
        match parts.as_slice() {
            [engineer] => {
                check_user_name(engineer, LoginPart::Engineer)?;
                Ok(Login::Plain((*engineer).to_owned()))
            }
            [engineer, account, host] => {
                Ok(Login::Composite(LoginString::new(engineer, account, host)?))
            }
            _ => Err(LoginError::WrongShape(parts.len().saturating_sub(1))),
        }
    }

    /// The engineer behind this login.
    pub fn engineer(&self) -> &str {
        match self {
            Login::Plain(e) => e,
            Login::Composite(l) => &l.engineer,
        }
    }
}

impl fmt::Display for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Login::Plain(e) => f.write_str(e),
            Login::Composite(l) => l.fmt(f),
        }
    }
}

impl LoginString {
    /// Builds a login string from its parts, checking each against the grammar.
    pub fn new(engineer: &str, account: &str, host: &str) -> Result<LoginString, LoginError> {
        check_user_name(engineer, LoginPart::Engineer)?;
        check_user_name(account, LoginPart::Account)?;
        check_host_name(host)?;
        let total = engineer.len() + account.len() + host.len() + 2;
        if total > MAX_LOGIN_LEN {
            return Err(LoginError::TooLong {
                part: LoginPart::Whole,
                max: MAX_LOGIN_LEN,
            });
        }
        Ok(LoginString {
            engineer: engineer.to_owned(),
            account: account.to_owned(),
            host: host.to_owned(),
        })
    }

    /// `account@host`, the target half (what grant patterns match).
    pub fn target(&self) -> String {
        format!("{}@{}", self.account, self.host)
    }
}

impl fmt::Display for LoginString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}@{}", self.engineer, self.account, self.host)
    }
}

/// Checks characters that are never acceptable anywhere, so the most telling reason wins.
fn check_whole(s: &str) -> Result<(), LoginError> {
    if s.is_empty() {
        return Err(LoginError::Empty(LoginPart::Whole));
    }
    for ch in s.chars() {
        if !ch.is_ascii() {
            return Err(LoginError::NonAscii);
        }
        if ch == ':' {
            return Err(LoginError::Colon);
        }
        if ch.is_ascii_whitespace() {
            return Err(LoginError::Whitespace);
        }
        if ch.is_ascii_control() {
            return Err(LoginError::Control);
        }
    }
    if s.len() > MAX_LOGIN_LEN {
        return Err(LoginError::TooLong {
            part: LoginPart::Whole,
            max: MAX_LOGIN_LEN,
        });
    }
    Ok(())
}

fn check_common(s: &str, part: LoginPart, max: usize) -> Result<(), LoginError> {
    if s.is_empty() {
        return Err(LoginError::Empty(part));
    }
    check_whole(s).map_err(|e| match e {
        LoginError::TooLong { .. } => LoginError::TooLong { part, max },
        other => other,
    })?;
    if s.len() > max {
        return Err(LoginError::TooLong { part, max });
    }
    if s.contains("..") {
        return Err(LoginError::DotDot(part));
    }
    Ok(())
}

/// Checks an engineer or account name: `[a-z_][a-z0-9_.-]*`, at most [`MAX_USER_NAME_LEN`].
pub fn check_user_name(s: &str, part: LoginPart) -> Result<(), LoginError> {
    check_common(s, part, MAX_USER_NAME_LEN)?;
    for (i, ch) in s.chars().enumerate() {
        let ok = if i == 0 {
            ch.is_ascii_lowercase() || ch == '_'
        } else {
            ch.is_ascii_lowercase() || ch.is_ascii_digit() || matches!(ch, '_' | '.' | '-')
        };
        if !ok {
            if i == 0 && (ch.is_ascii_digit() || ch == '-' || ch == '.') {
                return Err(LoginError::BadStart { part, ch });
            }
            return Err(LoginError::BadChar { part, ch });
        }
    }
    Ok(())
}

/// Checks an inventory host name: `[A-Za-z0-9][A-Za-z0-9.-]*`, at most [`MAX_HOST_NAME_LEN`].
pub fn check_host_name(s: &str) -> Result<(), LoginError> {
    let part = LoginPart::Host;
    check_common(s, part, MAX_HOST_NAME_LEN)?;
    for (i, ch) in s.chars().enumerate() {
        let ok = if i == 0 {
            ch.is_ascii_alphanumeric()
        } else {
            ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-')
        };
        if !ok {
            if i == 0 && (ch == '-' || ch == '.') {
                return Err(LoginError::BadStart { part, ch });
            }
            return Err(LoginError::BadChar { part, ch });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_plain_and_composite() {
        assert_eq!(Login::parse("alice"), Ok(Login::Plain("alice".into())));
        let l = Login::parse("alice@root@web-01").unwrap();
        assert_eq!(
            l,
            Login::Composite(LoginString {
                engineer: "alice".into(),
                account: "root".into(),
                host: "web-01".into()
            })
        );
        assert_eq!(l.to_string(), "alice@root@web-01");
        assert_eq!(l.engineer(), "alice");
        assert!(Login::parse("_svc.x-1@ecs-user@Web-01.prod").is_ok());
    }

    #[test]
    fn rejects_with_reasons() {
        let cases: &[(&str, LoginError)] = &[
            ("", LoginError::Empty(LoginPart::Whole)),
            ("alice@@web-01", LoginError::Empty(LoginPart::Account)),
            ("@root@web-01", LoginError::Empty(LoginPart::Engineer)),
            ("alice@root@", LoginError::Empty(LoginPart::Host)),
            ("alice@root", LoginError::WrongShape(1)),
            ("alice@root@web@x", LoginError::WrongShape(3)),
            ("alice:bsdauth", LoginError::Colon),
            ("alice@root@web-01:x", LoginError::Colon),
            ("alice bob", LoginError::Whitespace),
            ("alice\n", LoginError::Whitespace),
            ("alice\0", LoginError::Control),
            ("al\x07ice", LoginError::Control),
            ("alicé", LoginError::NonAscii),
            ("alice@root@..", LoginError::DotDot(LoginPart::Host)),
            (
                "alice@root@.web",
                LoginError::BadStart {
                    part: LoginPart::Host,
                    ch: '.',
                },
            ),
            ("alice@root@web..01", LoginError::DotDot(LoginPart::Host)),
            ("a..b", LoginError::DotDot(LoginPart::Engineer)),
            ("alice@root@../etc", LoginError::DotDot(LoginPart::Host)),
            (
                "alice@root@web/01",
                LoginError::BadChar {
                    part: LoginPart::Host,
                    ch: '/',
                },
            ),
            (
                "-alice",
                LoginError::BadStart {
                    part: LoginPart::Engineer,
                    ch: '-',
                },
            ),
            (
                "alice@-oProxy@web",
                LoginError::BadStart {
                    part: LoginPart::Account,
                    ch: '-',
                },
            ),
            (
                "alice@root@-web",
                LoginError::BadStart {
                    part: LoginPart::Host,
                    ch: '-',
                },
            ),
            (
                "1alice",
                LoginError::BadStart {
                    part: LoginPart::Engineer,
                    ch: '1',
                },
            ),
            (
                "Alice",
                LoginError::BadChar {
                    part: LoginPart::Engineer,
                    ch: 'A',
                },
            ),
            (
                "al%ice",
                LoginError::BadChar {
                    part: LoginPart::Engineer,
                    ch: '%',
                },
            ),
            (
                "alice@ro*t@web",
                LoginError::BadChar {
                    part: LoginPart::Account,
                    ch: '*',
                },
            ),
            (
                "abcdefghijabcdefghijabcdefghijabc",
                LoginError::TooLong {
                    part: LoginPart::Engineer,
                    max: MAX_USER_NAME_LEN,
                },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(Login::parse(input).as_ref(), Err(want), "input {input:?}");
            // every reason is printable for people
            assert!(!want.to_string().is_empty());
        }
        let long_host = "h".repeat(64);
        assert_eq!(
            Login::parse(&format!("a@b@{long_host}")),
            Err(LoginError::TooLong {
                part: LoginPart::Host,
                max: MAX_HOST_NAME_LEN
            })
        );
        // parts within their limits, whole string over 128
        let s = format!("{}@{}@{}", "e".repeat(32), "a".repeat(32), "h".repeat(63));
        assert_eq!(
            Login::parse(&s),
            Err(LoginError::TooLong {
                part: LoginPart::Whole,
                max: MAX_LOGIN_LEN
            })
        );
        let s = format!("{}@{}@{}", "e".repeat(32), "a".repeat(32), "h".repeat(62));
        assert!(Login::parse(&s).is_ok());
        assert_eq!(
            Login::parse(&"x".repeat(5000)),
            Err(LoginError::TooLong {
                part: LoginPart::Whole,
                max: 128
            })
        );
    }

    #[test]
    fn new_checks_parts() {
        assert!(LoginString::new("alice", "root", "web-01").is_ok());
        assert!(LoginString::new("alice", "ro@ot", "web-01").is_err());
        assert_eq!(
            LoginString::new("alice", "root", "web-01")
                .unwrap()
                .target(),
            "root@web-01"
        );
    }

    fn user_name() -> impl Strategy<Value = String> {
        "[a-z_][a-z0-9_-]{0,30}"
    }
    fn host_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9][A-Za-z0-9-]{0,40}"
    }

    proptest! {
        #[test]
        fn format_parse_roundtrip(e in user_name(), a in user_name(), h in host_name()) {
            let ls = LoginString::new(&e, &a, &h).unwrap();
            let text = ls.to_string();
            prop_assert_eq!(Login::parse(&text), Ok(Login::Composite(ls)));
            prop_assert_eq!(Login::parse(&e).map(|l| l.to_string()), Ok(e.clone()));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in any::<String>()) {
            if let Ok(l) = Login::parse(&s) {
                // anything accepted formats back to exactly the input
                prop_assert_eq!(l.to_string(), s);
            }
        }

        #[test]
        fn arbitrary_bytes_like_strings_never_panic(s in "[ -~\\x00-\\x1f@:]{0,200}") {
            if let Ok(l) = Login::parse(&s) {
                prop_assert_eq!(l.to_string(), s.clone());
                prop_assert!(s.len() <= MAX_LOGIN_LEN);
                prop_assert!(!s.contains(':') && !s.contains(".."));
            }
        }
    }
}
