//! The PAM side of `enable`: a pam-auth-update profile on Debian-family systems, a marked
//! block in `/etc/pam.d/sshd` elsewhere. Both are rendered from the one snippet shipped in
//! `packaging/pam.d/`, so the system tests and `enable` wire exactly the same lines.
#![forbid(unsafe_code)]

/// The PAM lines kmsbastion adds to sshd's stack (shipped snippet, pam.d syntax).
pub const SNIPPET: &str = include_str!("../../packaging/pam.d/kmsbastion");

/// The profile name for pam-auth-update.
pub const PROFILE_NAME: &str = "kmsbastion";
/// Where pam-auth-update reads profiles.
pub const PROFILE_PATH: &str = "/usr/share/pam-configs/kmsbastion";
/// pam-auth-update itself: its presence means "Debian family".
pub const PAM_AUTH_UPDATE: &str = "/usr/sbin/pam-auth-update";
/// The files pam-auth-update generates.
pub const COMMON_ACCOUNT: &str = "/etc/pam.d/common-account";
/// sshd's PAM service file (edited only where there is no pam-auth-update).
pub const SSHD_SERVICE: &str = "/etc/pam.d/sshd";
/// The module file name.
pub const MODULE: &str = "pam_kmsbastion.so";
/// The directories where the module may live, per distribution family.
pub const SECURITY_DIRS: [&str; 5] = [
    "/usr/lib/x86_64-linux-gnu/security",
    "/lib/x86_64-linux-gnu/security",
    "/usr/lib64/security",
    "/lib64/security",
    "/usr/lib/security",
];
/// The directories whose files pam-auth-update may rewrite: the generated stacks, its saved
/// copies, and the debconf database that remembers the selection. `enable` snapshots them
/// before running it, so `disable` can put back every byte.
pub const PAM_AUTH_UPDATE_DIRS: [&str; 3] = ["/etc/pam.d", "/var/lib/pam", "/var/cache/debconf"];

const BEGIN: &str = "# BEGIN kmsbastion";
const END: &str = "# END kmsbastion";
const MARK_NOTE: &str = "(added by `kmsbastion enable`; `kmsbastion disable` removes it)";

/// One line of a PAM stack: type, control (possibly `[...]` with spaces) and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PamLine {
    /// `account`, `session`, `auth` or `password`.
    pub kind: String,
    /// `required`, `optional`, `[success=ok ...]`, ...
    pub control: String,
    /// Module path and arguments.
    pub module: String,
}

/// The module lines of a pam.d snippet.
pub fn snippet_lines(text: &str) -> Vec<PamLine> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<PamLine> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (kind, rest) = line.split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (control, module) = if rest.starts_with('[') {
        let end = rest.find(']')?;
        (rest.get(..=end)?, rest.get(end + 1..)?)
    } else {
        rest.split_once(char::is_whitespace)?
    };
    Some(PamLine {
        kind: kind.to_string(),
        control: control.to_string(),
        module: module.split_whitespace().collect::<Vec<_>>().join(" "),
    })
}

/// The pam-auth-update profile for the snippet. `Default: no` means installing the package
/// (or any other package's `pam-auth-update --package`) never enables it; only
/// `kmsbastion enable` does. Sessions are interactive-only: sshd uses `common-session`.
pub fn profile(lines: &[PamLine]) -> String {
    let mut out = String::from(
        "Name: kmsbastion: grant check and credential broker for bastion logins\n\
         Default: no\n\
         Priority: 0\n",
    );
    for (kind, title) in [("account", "Account"), ("session", "Session")] {
        let selected: Vec<&PamLine> = lines.iter().filter(|l| l.kind == kind).collect();
        if selected.is_empty() {
            continue;
        }
        out.push_str(&format!("{title}-Type: Additional\n"));
        if kind == "session" {
            out.push_str("Session-Interactive-Only: yes\n");
        }
        out.push_str(&format!("{title}:\n"));
        for l in selected {
            out.push_str(&format!("\t{} {}\n", l.control, l.module));
        }
    }
    out
}

/// True when a generated or edited stack already calls the module.
pub fn mentions_module(text: &str) -> bool {
    text.lines().filter_map(parse_line).any(|l| {
        l.module
            .split(' ')
            .next()
            .is_some_and(|m| m.ends_with(MODULE))
    })
}

/// `/etc/pam.d/sshd` with kmsbastion's lines added as marked blocks: the account lines
/// BEFORE the first account line (so no earlier `sufficient` module can skip the grant
/// check of a bastion login), the session lines after the last session line. Already
/// wired text is returned unchanged.
pub fn wire_service(text: &str, lines: &[PamLine]) -> String {
    if text.contains(BEGIN) || mentions_module(text) {
        return text.to_string();
    }
    let block = |kind: &str| -> String {
        let body: String = lines
            .iter()
            .filter(|l| l.kind == kind)
            .map(|l| format!("{} {} {}\n", l.kind, l.control, l.module))
            .collect();
        if body.is_empty() {
            return body;
        }
        format!("{BEGIN} {kind} {MARK_NOTE}\n{body}{END} {kind}\n")
    };
    let kind_of = |line: &str| -> Option<String> {
        let t = line.trim();
        if t.starts_with('#') {
            return None;
        }
        if let Some(target) = t.strip_prefix("@include") {
            let target = target.trim();
            return ["account", "session"]
                .iter()
                .find(|k| target.contains(*k))
                .map(|k| k.to_string());
        }
        parse_line(t).map(|l| l.kind.trim_start_matches('-').to_string())
    };
    let all: Vec<&str> = text.split_inclusive('\n').collect();
    let first_account = all
        .iter()
        .position(|l| kind_of(l).as_deref() == Some("account"));
    let last_session = all
        .iter()
        .rposition(|l| kind_of(l).as_deref() == Some("session"));
    let mut out = String::with_capacity(text.len() + 512);
    let ensure_newline = |out: &mut String| {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
    };
    for (index, line) in all.iter().enumerate() {
        if Some(index) == first_account {
            out.push_str(&block("account"));
        }
        out.push_str(line);
        if Some(index) == last_session {
            ensure_newline(&mut out);
            out.push_str(&block("session"));
        }
    }
    if first_account.is_none() {
        ensure_newline(&mut out);
        out.push_str(&block("account"));
    }
    if last_session.is_none() {
        ensure_newline(&mut out);
        out.push_str(&block("session"));
    }
    out
}

/// `/etc/pam.d/sshd` without the blocks [`wire_service`] added (from each `# BEGIN
/// kmsbastion` line through the next `# END kmsbastion` line); everything else is kept, so
/// edits made after `enable` survive `disable`.
pub fn unwire_service(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in text.split_inclusive('\n') {
        if !inside && line.starts_with(BEGIN) {
            inside = true;
            continue;
        }
        if inside {
            if line.starts_with(END) {
                inside = false;
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_snippet_has_account_and_session_lines_for_our_module() {
        let lines = snippet_lines(SNIPPET);
        assert!(lines.iter().any(|l| l.kind == "account"));
        assert!(lines.iter().any(|l| l.kind == "session"));
        assert!(lines.iter().all(|l| l.module.starts_with(MODULE)));
    }

    fn sample() -> Vec<PamLine> {
        snippet_lines(
            "# comment\naccount [success=ok ignore=ignore default=die] pam_kmsbastion.so\nsession optional pam_kmsbastion.so\n",
        )
    }

    #[test]
    fn profile_has_the_pam_auth_update_fields() {
        assert_eq!(
            profile(&sample()),
            "Name: kmsbastion: grant check and credential broker for bastion logins\nDefault: no\nPriority: 0\n\
             Account-Type: Additional\nAccount:\n\t[success=ok ignore=ignore default=die] pam_kmsbastion.so\n\
             Session-Type: Additional\nSession-Interactive-Only: yes\nSession:\n\toptional pam_kmsbastion.so\n"
        );
    }

    #[test]
    fn service_block_goes_before_account_and_after_session() {
        let rhel = "#%PAM-1.0\nauth substack password-auth\naccount required pam_sepermit.so\naccount include password-auth\nsession include password-auth\nsession include postlogin\n";
        let out = wire_service(rhel, &sample());
        let expected = "#%PAM-1.0\nauth substack password-auth\n\
            # BEGIN kmsbastion account (added by `kmsbastion enable`; `kmsbastion disable` removes it)\n\
            account [success=ok ignore=ignore default=die] pam_kmsbastion.so\n# END kmsbastion account\n\
            account required pam_sepermit.so\naccount include password-auth\nsession include password-auth\nsession include postlogin\n\
            # BEGIN kmsbastion session (added by `kmsbastion enable`; `kmsbastion disable` removes it)\n\
            session optional pam_kmsbastion.so\n# END kmsbastion session\n";
        assert_eq!(out, expected);
        assert_eq!(wire_service(&out, &sample()), out, "idempotent");
        assert!(mentions_module(&out));
        assert!(!mentions_module(rhel));
    }

    #[test]
    fn service_without_account_or_session_lines_gets_blocks_appended() {
        let out = wire_service("auth required pam_unix.so", &sample());
        assert!(out.starts_with("auth required pam_unix.so\n# BEGIN kmsbastion account"));
        assert!(out.ends_with("# END kmsbastion session\n"));
    }

    #[test]
    fn unwire_removes_exactly_the_blocks() {
        let rhel = "#%PAM-1.0\naccount required pam_sepermit.so\nsession include postlogin\n";
        let wired = wire_service(rhel, &sample());
        assert_eq!(unwire_service(&wired), rhel);
        let later = format!("{wired}session optional pam_motd.so\n");
        assert_eq!(
            unwire_service(&later),
            format!("{rhel}session optional pam_motd.so\n")
        );
    }
}
