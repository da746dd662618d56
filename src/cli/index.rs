//! `kmsbastion index [--check]`: rebuild (or check) the lookup index of the configuration,
//! which lets the AuthorizedKeysCommand, the PAM module, the login shell, the broker and the
//! NSS module skip parsing a large inventory (see `crate::config::index`).
#![forbid(unsafe_code)]

use super::{Cli, CliError, Outcome};
use crate::config::index::{self, Index, IndexError};
use std::path::Path;
use std::time::Instant;

/// `kmsbastion index`: rebuild; `--check`: say whether the index is fresh (exit 1 if not).
pub fn run(cli: &Cli, check: bool) -> Result<Outcome, CliError> {
    if check {
        return Ok(match Index::open(&cli.config) {
            Ok(ix) => {
                println!(
                    "index: fresh: {} ({} bytes) matches {}",
                    index::index_path(&cli.config).display(),
                    ix.len(),
                    cli.config.display()
                );
                Outcome::Ok
            }
            Err(why) => {
                println!(
                    "index: not used: {} is {why}; the helpers parse the whole configuration until `kmsbastion index` (or the next bastion login) rebuilds it",
                    index::index_path(&cli.config).display()
                );
                Outcome::Findings
            }
        });
    }
    let started = Instant::now();
    match index::build(&cli.config) {
        Ok(b) => {
            println!(
                "index: wrote {} ({} bytes: {} engineer(s), {} host(s), {} grant(s)) for {} in {} ms",
                b.path.display(),
                b.bytes,
                b.engineers,
                b.hosts,
                b.grants,
                cli.config.display(),
                started.elapsed().as_millis()
            );
            Ok(Outcome::Ok)
        }
        Err(IndexError::Config(e)) => Err(CliError::Config(e)),
        Err(IndexError::Unsettled) => Err(CliError::System(format!(
            "index not written: {}",
            IndexError::Unsettled
        ))),
        Err(e) => Err(CliError::System(format!(
            "index not written: {e} (run as root; the index lives in {})",
            index::INDEX_DIR
        ))),
    }
}

/// One line for `kmsbastion check`: whether the helpers answer from a fresh index.
pub(crate) fn status(config: &Path) -> Result<String, String> {
    let path = index::index_path(config);
    match Index::open(config) {
        Ok(ix) => Ok(format!("{} is fresh ({} bytes)", path.display(), ix.len())),
        Err(why) => Err(format!(
            "{} is {why}: logins are correct but every helper parses the whole file; run `kmsbastion index`",
            path.display()
        )),
    }
}

/// After a subcommand rewrote the configuration: rebuild an index that exists (it is stale
/// now and would be ignored). Without one, nothing is done: the next bastion login writes it.
pub(crate) fn refresh_after_edit(config: &Path) {
    if !index::index_path(config).exists() {
        return;
    }
    match index::build(config) {
        Ok(b) => println!("index: rebuilt {}", b.path.display()),
        Err(e) => eprintln!(
            "kmsbastion: warning: the lookup index was not rebuilt ({e}); it is ignored while stale: run `kmsbastion index` as root"
        ),
    }
}
