//! Adding `kmsbastion` to the `passwd:` and `group:` databases of `/etc/nsswitch.conf`.
#![forbid(unsafe_code)]

/// The NSS service name (glibc loads `libnss_kmsbastion.so.2`).
pub const SERVICE: &str = "kmsbastion";

/// The databases that must consult kmsbastion.
pub const DATABASES: [&str; 2] = ["passwd", "group"];

/// Why nsswitch.conf cannot be edited safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsswitchError {
    /// A database has no line at all (glibc would use its built-in default).
    MissingDatabase(&'static str),
    /// A database line lists neither `files` nor `compat`, so "after files" has no meaning.
    NoLocalSource { database: &'static str, line: usize },
}

impl std::fmt::Display for NsswitchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NsswitchError::MissingDatabase(db) => write!(
                f,
                "it has no `{db}:` line; add `{db}: files` (the glibc default) and run enable again"
            ),
            NsswitchError::NoLocalSource { database, line } => write!(
                f,
                "line {line} (`{database}:`) lists neither `files` nor `compat`; add `{SERVICE}` \
                 to it by hand after the source of local accounts"
            ),
        }
    }
}

/// `text` with `kmsbastion` added right after `files` (or `compat`, and after that
/// source's `[STATUS=action]` items) on the `passwd:` and `group:` lines. Lines that
/// already name kmsbastion are left alone, so the edit is idempotent; every other byte
/// (comments, spacing, other databases) is preserved.
pub fn add_service(text: &str) -> Result<String, NsswitchError> {
    let mut seen = [false; DATABASES.len()];
    let mut out = String::with_capacity(text.len() + 32);
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let (line, ending) = match raw.strip_suffix('\n') {
            Some(l) => (l, "\n"),
            None => (raw, ""),
        };
        let Some((slot, database)) = database_of(line) else {
            out.push_str(raw);
            continue;
        };
        if let Some(s) = seen.get_mut(slot) {
            *s = true;
        }
        out.push_str(&edit_line(line, database, index + 1)?);
        out.push_str(ending);
    }
    for (slot, database) in DATABASES.iter().enumerate() {
        if !seen.get(slot).copied().unwrap_or(false) {
            return Err(NsswitchError::MissingDatabase(database));
        }
    }
    Ok(out)
}

/// True when both databases already consult kmsbastion.
pub fn is_enabled(text: &str) -> bool {
    let mut found = 0;
    for line in text.lines() {
        if let Some((_, _)) = database_of(line) {
            if sources(line).contains(&SERVICE) {
                found += 1;
            }
        }
    }
    found >= DATABASES.len()
}

/// Which of our databases a line configures (`passwd:` / `group:`), ignoring comments.
fn database_of(line: &str) -> Option<(usize, &'static str)> {
    let trimmed = line.trim_start();
    if trimmed.starts_with('#') {
        return None;
    }
    let (name, _) = trimmed.split_once(':')?;
    DATABASES
        .iter()
        .enumerate()
        .find(|(_, db)| **db == name.trim())
        .map(|(slot, db)| (slot, *db))
}

/// The service words of a database line (action items and comments excluded).
fn sources(line: &str) -> Vec<&str> {
    let body = line.split_once(':').map(|(_, b)| b).unwrap_or("");
    let body = body.split('#').next().unwrap_or("");
    let mut out = Vec::new();
    let mut in_action = false;
    for word in body.split_whitespace() {
        if word.starts_with('[') {
            in_action = true;
        }
        if !in_action {
            out.push(word);
        }
        if word.ends_with(']') {
            in_action = false;
        }
    }
    out
}

/// `text` without `kmsbastion` on the `passwd:` and `group:` lines (the word and the blanks
/// before it); every other byte is kept. The inverse of [`add_service`] for a file that was
/// edited after `enable`, so those later edits survive `disable`.
pub fn remove_service(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for raw in text.split_inclusive('\n') {
        if database_of(raw.trim_end_matches('\n')).is_none() {
            out.push_str(raw);
            continue;
        }
        let code_end = raw.find('#').unwrap_or(raw.len());
        let (code, rest) = (
            raw.get(..code_end).unwrap_or(raw),
            raw.get(code_end..).unwrap_or(""),
        );
        let mut kept = String::with_capacity(code.len());
        let mut cursor = 0;
        let mut in_action = false;
        while cursor < code.len() {
            let tail = code.get(cursor..).unwrap_or("");
            let blanks = tail.len() - tail.trim_start().len();
            let word_start = cursor + blanks;
            let word_tail = code.get(word_start..).unwrap_or("");
            let word_len = word_tail
                .find(char::is_whitespace)
                .unwrap_or(word_tail.len());
            let word = word_tail.get(..word_len).unwrap_or("");
            if word.starts_with('[') {
                in_action = true;
            }
            let drop = !in_action && word == SERVICE;
            if word.ends_with(']') {
                in_action = false;
            }
            if !drop {
                kept.push_str(code.get(cursor..word_start + word_len).unwrap_or(""));
            }
            cursor = word_start + word_len;
            if word_len == 0 {
                kept.push_str(code.get(word_start..).unwrap_or(""));
                break;
            }
        }
        out.push_str(&kept);
        out.push_str(rest);
    }
    out
}

fn edit_line(line: &str, database: &'static str, number: usize) -> Result<String, NsswitchError> {
    if sources(line).contains(&SERVICE) {
        return Ok(line.to_string());
    }
    // Byte offset just after the local source and its action items.
    let colon = line.find(':').unwrap_or(0);
    let body = line.get(colon + 1..).unwrap_or("");
    let body_end = body.find('#').unwrap_or(body.len());
    let mut cursor = 0;
    let mut insert_at = None;
    let mut after_local = false;
    let mut in_action = false;
    let code = body.get(..body_end).unwrap_or("");
    while cursor < code.len() {
        let rest = code.get(cursor..).unwrap_or("");
        let skipped = rest.len() - rest.trim_start().len();
        cursor += skipped;
        let rest = code.get(cursor..).unwrap_or("");
        if rest.is_empty() {
            break;
        }
        let word_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = rest.get(..word_len).unwrap_or("");
        let word_end = cursor + word_len;
        if word.starts_with('[') {
            in_action = true;
        }
        if in_action {
            if after_local && word.ends_with(']') {
                insert_at = Some(word_end);
            }
        } else {
            after_local = word == "files" || word == "compat";
            if after_local {
                insert_at = Some(word_end);
            }
        }
        if word.ends_with(']') {
            in_action = false;
        }
        if insert_at.is_some() && !after_local {
            break;
        }
        cursor = word_end;
    }
    let Some(at) = insert_at else {
        return Err(NsswitchError::NoLocalSource {
            database,
            line: number,
        });
    };
    let split = colon + 1 + at;
    let (head, tail) = (
        line.get(..split).unwrap_or(line),
        line.get(split..).unwrap_or(""),
    );
    Ok(format!("{head} {SERVICE}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN12: &str = "# /etc/nsswitch.conf\n\npasswd:         files\ngroup:          files\nshadow:         files\ngshadow:        files\n\nhosts:          files dns\n";

    #[test]
    fn adds_after_files_and_keeps_everything_else() {
        let out = add_service(DEBIAN12).unwrap();
        assert_eq!(
            out,
            DEBIAN12
                .replace(
                    "passwd:         files\n",
                    "passwd:         files kmsbastion\n"
                )
                .replace(
                    "group:          files\n",
                    "group:          files kmsbastion\n"
                )
        );
        assert!(is_enabled(&out));
        assert!(!is_enabled(DEBIAN12));
    }

    #[test]
    fn idempotent() {
        let once = add_service(DEBIAN12).unwrap();
        assert_eq!(add_service(&once).unwrap(), once);
    }

    #[test]
    fn keeps_order_with_systemd_and_actions() {
        let text = "passwd: files [NOTFOUND=continue] systemd\ngroup: compat systemd # c\n";
        let out = add_service(text).unwrap();
        assert_eq!(
            out,
            "passwd: files [NOTFOUND=continue] kmsbastion systemd\ngroup: compat kmsbastion systemd # c\n"
        );
    }

    #[test]
    fn no_trailing_newline_is_preserved() {
        assert_eq!(
            add_service("passwd: files\ngroup: files").unwrap(),
            "passwd: files kmsbastion\ngroup: files kmsbastion"
        );
    }

    #[test]
    fn refuses_without_a_local_source_or_line() {
        assert_eq!(
            add_service("passwd: sss\ngroup: files\n"),
            Err(NsswitchError::NoLocalSource {
                database: "passwd",
                line: 1
            })
        );
        assert_eq!(
            add_service("passwd: files\n#group: files\n"),
            Err(NsswitchError::MissingDatabase("group"))
        );
    }

    #[test]
    fn remove_is_the_inverse_of_add_and_keeps_later_edits() {
        let once = add_service(DEBIAN12).unwrap();
        assert_eq!(remove_service(&once), DEBIAN12);
        let later = format!("{once}netgroup:       nis\n");
        assert_eq!(
            remove_service(&later),
            format!("{DEBIAN12}netgroup:       nis\n")
        );
        let odd = "passwd: files [NOTFOUND=continue] kmsbastion systemd # kmsbastion\ngroup: kmsbastion\n";
        assert_eq!(
            remove_service(odd),
            "passwd: files [NOTFOUND=continue] systemd # kmsbastion\ngroup:\n"
        );
    }
}
