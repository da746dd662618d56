//! How listings reach people and scripts: aligned tables on stdout, JSON with `--json`, and a
//! transient progress line on stderr when stderr is a terminal.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};

/// Renders rows as left-aligned columns separated by two spaces, with a header line.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(cell.chars().count());
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| "null".to_string())
    );
}

/// A one-line progress indicator on stderr, shown only when stderr is a terminal (so logs and
/// pipes stay clean). Cleared when dropped.
pub struct Progress {
    enabled: bool,
    shown: bool,
}

impl Progress {
    /// Starts a progress indicator (silent unless stderr is a tty).
    pub fn new() -> Self {
        Self {
            enabled: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    /// Replaces the progress line with `what (done/total)`.
    pub fn step(&mut self, done: usize, total: usize, what: &str) {
        if !self.enabled {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{what} ({done}/{total})");
        let _ = err.flush();
        self.shown = true;
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.shown {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_trims_trailing_space() {
        let t = table(
            &["HOST", "ACCOUNT", "SECRET"],
            &[
                vec!["web-01".into(), "root".into(), "acs/ecs/web-01/root".into()],
                vec!["db".into(), "".into(), "x".into()],
            ],
        );
        assert_eq!(
            t,
            "HOST    ACCOUNT  SECRET\nweb-01  root     acs/ecs/web-01/root\ndb               x\n"
        );
    }
}
