//! `kmsbastion keyscan HOST`: ask the target's sshd for its host keys (`ssh-keyscan`), show
//! their fingerprints and pin them in the configuration. Also the host-key half of `check`.
//!
//! The scan goes through the [`HostKeyScanner`] seam so that the parsing, comparison and
//! pinning logic is unit-tested without a real sshd (the lab exercises the real one).
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use ssh_key::{HashAlg, PublicKey};

use super::edit::{ConfigDocument, SaveError};
use super::output::{print_json, table};
use super::{find_host, load_config_quiet, validate_edited, Cli, CliError, Outcome};

/// One host key offered by a target, without the comment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ScannedKey {
    /// `ssh-ed25519 AAAA…` (algorithm and base64 blob; what `host_keys` pins).
    pub openssh: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The key algorithm, e.g. `ssh-ed25519`.
    pub algorithm: String,
}

/// Something that fetches a target's host keys in `ssh-keyscan` output format.
pub trait HostKeyScanner {
    /// The raw `ssh-keyscan` output for `address`:`port`.
    fn scan(&self, address: &str, port: u16) -> Result<String, String>;
}

/// The real scanner: `ssh-keyscan -T SECS -p PORT -- ADDRESS`.
pub struct SshKeyscan {
    /// The program (`ssh-keyscan`, from `PATH`).
    pub program: String,
    /// Per-host timeout.
    pub timeout: Duration,
}

impl Default for SshKeyscan {
    fn default() -> Self {
        Self {
            program: "ssh-keyscan".to_string(),
            timeout: Duration::from_secs(5),
        }
    }
}

impl HostKeyScanner for SshKeyscan {
    fn scan(&self, address: &str, port: u16) -> Result<String, String> {
        let out = Command::new(&self.program)
            .arg("-T")
            .arg(self.timeout.as_secs().max(1).to_string())
            .arg("-p")
            .arg(port.to_string())
            .arg("--")
            .arg(address)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e} (install openssh-client)", self.program))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if stdout.trim().is_empty() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let detail = stderr
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(if detail.is_empty() {
                format!("no sshd answered at {address} port {port}")
            } else {
                format!("no sshd answered at {address} port {port}: {detail}")
            });
        }
        Ok(stdout)
    }
}

/// Parses `ssh-keyscan` output (`host algorithm base64`, `#` comments) into distinct keys,
/// sorted. Lines that do not hold a valid public key are an error: we are about to pin them.
pub fn parse_scan(output: &str) -> Result<Vec<ScannedKey>, String> {
    let mut keys = BTreeSet::new();
    for (n, line) in output.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (_host, algorithm, blob) = match (fields.next(), fields.next(), fields.next()) {
            (Some(h), Some(a), Some(b)) => (h, a, b),
            _ => {
                return Err(format!(
                    "ssh-keyscan output line {}: expected `host algorithm key`",
                    n + 1
                ))
            }
        };
        keys.insert(parse_key(&format!("{algorithm} {blob}"))?);
    }
    if keys.is_empty() {
        return Err("ssh-keyscan returned no host keys".to_string());
    }
    Ok(keys.into_iter().collect())
}

/// Parses one `algorithm base64 [comment]` public key (a pinned key or a scanned one).
pub fn parse_key(text: &str) -> Result<ScannedKey, String> {
    let key = PublicKey::from_openssh(text.trim())
        .map_err(|e| format!("not an OpenSSH public key ({e}): {}", abbreviate(text)))?;
    let algorithm = key.algorithm().as_str().to_string();
    let blob = text.split_whitespace().nth(1).unwrap_or_default();
    Ok(ScannedKey {
        openssh: format!("{algorithm} {blob}"),
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        algorithm,
    })
}

/// `ssh-ed25519 AAAAC3Nz…` shortened for messages.
pub fn abbreviate(key: &str) -> String {
    let key = key.trim();
    if key.chars().count() > 40 {
        format!("{}…", key.chars().take(40).collect::<String>())
    } else {
        key.to_string()
    }
}

/// How the scanned keys relate to the pinned ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinComparison {
    /// Scanned and pinned.
    pub matching: Vec<ScannedKey>,
    /// Scanned, not pinned.
    pub new: Vec<ScannedKey>,
    /// Pinned, not offered by the host any more (or not parseable: shown as is).
    pub gone: Vec<String>,
}

impl PinComparison {
    /// The pins exactly equal what the host offers.
    pub fn unchanged(&self) -> bool {
        self.new.is_empty() && self.gone.is_empty()
    }
    /// The onward `ssh` would accept the host: at least one offered key is pinned.
    pub fn trusted(&self) -> bool {
        !self.matching.is_empty()
    }
}

/// Compares `scanned` with `pinned` (pinned entries may carry comments).
pub fn compare(pinned: &[String], scanned: &[ScannedKey]) -> PinComparison {
    let pinned_keys: Vec<(String, Option<String>)> = pinned
        .iter()
        .map(|p| (p.clone(), parse_key(p).ok().map(|k| k.openssh)))
        .collect();
    let is_pinned = |k: &ScannedKey| {
        pinned_keys
            .iter()
            .any(|(_, o)| o.as_deref() == Some(k.openssh.as_str()))
    };
    let matching = scanned.iter().filter(|k| is_pinned(k)).cloned().collect();
    let new = scanned.iter().filter(|k| !is_pinned(k)).cloned().collect();
    let gone = pinned_keys
        .into_iter()
        .filter(|(_, o)| {
            !scanned
                .iter()
                .any(|k| Some(k.openssh.as_str()) == o.as_deref())
        })
        .map(|(p, _)| p)
        .collect();
    PinComparison {
        matching,
        new,
        gone,
    }
}

/// `kmsbastion keyscan HOST [--yes]`.
pub fn run(
    cli: &Cli,
    host_name: &str,
    yes: bool,
    json: bool,
    scanner: &dyn HostKeyScanner,
) -> Result<Outcome, CliError> {
    let cfg = load_config_quiet(cli)?;
    let host = find_host(&cfg, host_name)?;
    let raw = scanner
        .scan(&host.address, host.port)
        .map_err(|e| CliError::System(format!("keyscan {host_name}: {e}")))?;
    let scanned = parse_scan(&raw).map_err(|e| {
        CliError::System(format!(
            "keyscan {host_name} ({} port {}): {e}",
            host.address, host.port
        ))
    })?;
    let cmp = compare(&host.host_keys, &scanned);

    if json {
        // JSON mode never prompts: it pins only with --yes.
        let written = if !cmp.unchanged() && yes {
            pin(cli, host_name, &scanned)?
        } else {
            false
        };
        print_json(&serde_json::json!({
            "host": host.name,
            "address": host.address,
            "port": host.port,
            "keys": scanned.iter().map(|k| serde_json::json!({
                "algorithm": k.algorithm,
                "fingerprint": k.fingerprint,
                "key": k.openssh,
                "pinned": cmp.matching.contains(k),
            })).collect::<Vec<_>>(),
            "unpinned_after": cmp.gone,
            "unchanged": cmp.unchanged(),
            "written": written,
        }));
        return Ok(if cmp.unchanged() || written {
            Outcome::Ok
        } else {
            Outcome::Findings
        });
    }

    println!(
        "{} ({} port {}) offers {} host key(s):",
        host.name,
        host.address,
        host.port,
        scanned.len()
    );
    let rows: Vec<Vec<String>> = scanned
        .iter()
        .map(|k| {
            vec![
                k.algorithm.clone(),
                k.fingerprint.clone(),
                if cmp.matching.contains(k) {
                    "pinned"
                } else {
                    "new"
                }
                .to_string(),
            ]
        })
        .collect();
    print!("{}", table(&["ALGORITHM", "FINGERPRINT", "STATE"], &rows));
    for gone in &cmp.gone {
        let shown = parse_key(gone)
            .map(|k| k.fingerprint)
            .unwrap_or_else(|_| abbreviate(gone));
        println!("pinned but no longer offered (will be removed): {shown}");
    }
    if cmp.unchanged() {
        println!("{}: host keys already pinned; nothing to do", host.name);
        return Ok(Outcome::Ok);
    }
    if !cmp.trusted() && !host.host_keys.is_empty() {
        println!(
            "WARNING: none of the offered keys is pinned: either the host was reinstalled or \
             something is intercepting the connection. Check the fingerprints on the host's console."
        );
    }
    if !yes
        && !confirm(&format!(
            "Pin these {} key(s) for {} in {}? [y/N] ",
            scanned.len(),
            host.name,
            cli.config.display()
        ))?
    {
        println!("not pinned; nothing changed");
        return Ok(Outcome::Findings);
    }
    pin(cli, host_name, &scanned)?;
    println!(
        "pinned {} host key(s) for {} in {}",
        scanned.len(),
        host.name,
        cli.config.display()
    );
    Ok(Outcome::Ok)
}

/// Writes `keys` as the host's `host_keys`. Returns whether the file changed.
fn pin(cli: &Cli, host: &str, keys: &[ScannedKey]) -> Result<bool, CliError> {
    let mut doc = ConfigDocument::load(&cli.config)?;
    let pins: Vec<String> = keys.iter().map(|k| k.openssh.clone()).collect();
    doc.set_host_keys(host, &pins)?;
    match doc.save(validate_edited) {
        Ok(written) => {
            if written {
                super::index::refresh_after_edit(&cli.config);
            }
            Ok(written)
        }
        Err(SaveError::Invalid(e)) => Err(CliError::Usage(format!(
            "the configuration would not load with the new host keys; nothing written:\n{e}"
        ))),
        Err(SaveError::Edit(e)) => Err(e.into()),
    }
}

/// Asks on the terminal. Without a terminal on stdin, refuses: a pin needs a person or `--yes`.
fn confirm(question: &str) -> Result<bool, CliError> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::Refused(
            "not pinned: stdin is not a terminal; run with --yes to pin the keys shown".to_string(),
        ));
    }
    print!("{question}");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(|e| CliError::System(format!("cannot read the answer: {e}")))?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGM55JCfXuIE0FPMKbcyPJCzdwvaKan9ffNJ8Qxe7XDE";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIObC5Ry7yVluV/N47AfsknQL2gSP40rg8qoRALg5VFw5";

    struct Fake(Result<String, String>);
    impl HostKeyScanner for Fake {
        fn scan(&self, _: &str, _: u16) -> Result<String, String> {
            self.0.clone()
        }
    }

    #[test]
    fn parses_keyscan_output_with_comments_and_ports() {
        let out = format!(
            "# 127.0.0.2:22 SSH-2.0-OpenSSH_9.2p1\n[127.0.0.2]:2222 {ED}\n127.0.0.2 {ED}\n\n"
        );
        let keys = parse_scan(&Fake(Ok(out)).scan("127.0.0.2", 22).unwrap()).unwrap();
        assert_eq!(keys.len(), 1, "duplicates collapse");
        assert_eq!(keys[0].openssh, ED);
        assert_eq!(keys[0].algorithm, "ssh-ed25519");
        assert!(keys[0].fingerprint.starts_with("SHA256:"));
    }

    #[test]
    fn refuses_garbage_and_empty_output() {
        assert!(parse_scan("# only a comment\n").is_err());
        assert!(parse_scan("host ssh-ed25519 notbase64!!\n").is_err());
        assert!(parse_scan("host ssh-ed25519\n").is_err());
    }

    #[test]
    fn compare_reports_new_matching_and_gone() {
        let scanned = parse_scan(&format!("h {ED}\n")).unwrap();
        let c = compare(&[format!("{ED2} old")], &scanned);
        assert!(!c.trusted());
        assert_eq!(c.new.len(), 1);
        assert_eq!(c.gone, vec![format!("{ED2} old")]);

        let c = compare(&[format!("{ED} with-comment")], &scanned);
        assert!(c.trusted() && c.unchanged());
    }

    const CONFIG: &str = "# test\n[kms]\nendpoint = \"http://127.0.0.1:9\"\n\n[[host]]\nname = \"web-01\"  # keep me\naddress = \"127.0.0.2\"\n\n[[host]]\nname = \"web-02\"\naddress = \"127.0.0.3\"\nhost_keys = [\"ED2\"]\n";

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kmsbastion.toml");
        let text = CONFIG.replace("ED2", ED2);
        std::fs::write(&path, &text).unwrap();
        (dir, path, text)
    }

    fn cli(path: &std::path::Path) -> Cli {
        use clap::Parser as _;
        Cli::parse_from([
            "kmsbastion",
            "--config",
            path.to_str().unwrap(),
            "keyscan",
            "web-01",
            "--yes",
        ])
    }

    #[test]
    fn run_pins_scanned_keys_keeping_the_layout_and_is_idempotent() {
        let (_dir, path, text) = setup();
        let scan = Fake(Ok(format!("127.0.0.2 {ED} root@web-01\n")));
        let out = run(&cli(&path), "web-01", true, false, &scan).unwrap();
        assert_eq!(out, Outcome::Ok);
        let after = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            after,
            text.replace(
                "address = \"127.0.0.2\"\n",
                &format!("address = \"127.0.0.2\"\nhost_keys = [\n    \"{ED}\",\n]\n")
            )
        );
        // Same keys again: nothing written.
        assert_eq!(
            run(&cli(&path), "web-01", true, false, &scan).unwrap(),
            Outcome::Ok
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), after);
    }

    #[test]
    fn run_replaces_a_changed_host_key_only_when_confirmed() {
        let (_dir, path, text) = setup();
        let scan = Fake(Ok(format!("127.0.0.3 {ED}\n")));
        // JSON mode without --yes never writes.
        assert_eq!(
            run(&cli(&path), "web-02", false, true, &scan).unwrap(),
            Outcome::Findings
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(
            run(&cli(&path), "web-02", true, false, &scan).unwrap(),
            Outcome::Ok
        );
        let after = std::fs::read_to_string(&path).unwrap();
        assert!(after.contains(ED) && !after.contains(ED2), "{after}");
        assert!(after.contains("# keep me"));
    }

    #[test]
    fn run_failures_leave_the_file_alone() {
        let (_dir, path, text) = setup();
        let err = run(
            &cli(&path),
            "web-01",
            true,
            false,
            &Fake(Err("connection refused".into())),
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), super::super::EXIT_SYSTEM);
        assert!(err.to_string().contains("connection refused"), "{err}");
        let err = run(
            &cli(&path),
            "web-01",
            true,
            false,
            &Fake(Ok("h ssh-ed25519 AAAA\n".into())),
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), super::super::EXIT_SYSTEM);
        let err = run(
            &cli(&path),
            "db-01",
            true,
            false,
            &Fake(Ok(format!("h {ED}\n"))),
        )
        .unwrap_err();
        assert_eq!(err.exit_code(), super::super::EXIT_USAGE);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        // `echo "$ED" | ssh-keygen -lf -` prints this fingerprint.
        let k = parse_key(ED).unwrap();
        assert_eq!(
            k.fingerprint,
            "SHA256:tMJ8JXxRzn8BhpKZIdghAw7uFrmSegDZ0xqtoP5ed5g"
        );
    }
}
