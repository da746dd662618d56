//! Unified diffs of small text files, for `--dry-run` reports.
//!
//! The files `enable` touches are a few hundred lines at most, so a plain
//! longest-common-subsequence table is fast enough and keeps the crate free of a diff
//! dependency.
#![forbid(unsafe_code)]

/// Lines of context around each change, as in `diff -u`.
const CONTEXT: usize = 3;

/// One line of an edit script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Edit<'a> {
    Keep(&'a str),
    Delete(&'a str),
    Insert(&'a str),
}

/// The unified diff turning `old` into `new`, labelled with `old_label`/`new_label`.
/// `None` content means "the file does not exist" (shown as `/dev/null`).
/// Returns an empty string when the two are identical.
pub fn unified(old_label: &str, old: Option<&str>, new_label: &str, new: Option<&str>) -> String {
    if old == new {
        return String::new();
    }
    let old_lines: Vec<&str> = old.map(split_lines).unwrap_or_default();
    let new_lines: Vec<&str> = new.map(split_lines).unwrap_or_default();
    let edits = edit_script(&old_lines, &new_lines);
    let mut out = String::new();
    out.push_str(&format!(
        "--- {}\n",
        if old.is_some() {
            old_label
        } else {
            "/dev/null"
        }
    ));
    out.push_str(&format!(
        "+++ {}\n",
        if new.is_some() {
            new_label
        } else {
            "/dev/null"
        }
    ));
    for hunk in hunks(&edits) {
        out.push_str(&hunk);
    }
    if old.is_some_and(|t| !t.is_empty() && !t.ends_with('\n'))
        || new.is_some_and(|t| !t.is_empty() && !t.ends_with('\n'))
    {
        out.push_str("\\ (a file above does not end with a newline)\n");
    }
    out
}

/// Lines without their terminators; a trailing newline does not make an extra empty line.
fn split_lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

/// The shortest edit script, from a longest-common-subsequence table.
fn edit_script<'a>(old: &[&'a str], new: &[&'a str]) -> Vec<Edit<'a>> {
    let (n, m) = (old.len(), new.len());
    // lcs[i][j] = LCS length of old[i..] and new[j..]
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut edits = Vec::with_capacity(n + m);
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && old[i] == new[j] {
            edits.push(Edit::Keep(old[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Deletions first, as diff -u shows a replaced block.
            edits.push(Edit::Delete(old[i]));
            i += 1;
        } else {
            edits.push(Edit::Insert(new[j]));
            j += 1;
        }
    }
    edits
}

/// Groups the edit script into `@@` hunks with `CONTEXT` lines around each change.
fn hunks(edits: &[Edit<'_>]) -> Vec<String> {
    let changed: Vec<usize> = edits
        .iter()
        .enumerate()
        .filter(|(_, e)| !matches!(e, Edit::Keep(_)))
        .map(|(k, _)| k)
        .collect();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for &k in &changed {
        let start = k.saturating_sub(CONTEXT);
        let end = (k + CONTEXT + 1).min(edits.len());
        match ranges.last_mut() {
            Some(last) if start <= last.1 => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    let mut out = Vec::new();
    for (start, end) in ranges {
        // Line numbers (1-based) of the hunk's first line in the old and new file.
        let (mut old_line, mut new_line) = (1usize, 1usize);
        for e in edits.iter().take(start) {
            match e {
                Edit::Keep(_) => {
                    old_line += 1;
                    new_line += 1;
                }
                Edit::Delete(_) => old_line += 1,
                Edit::Insert(_) => new_line += 1,
            }
        }
        let slice = edits.get(start..end).unwrap_or_default();
        let old_count = slice
            .iter()
            .filter(|e| !matches!(e, Edit::Insert(_)))
            .count();
        let new_count = slice
            .iter()
            .filter(|e| !matches!(e, Edit::Delete(_)))
            .count();
        let mut text = format!(
            "@@ -{},{} +{},{} @@\n",
            if old_count == 0 {
                old_line - 1
            } else {
                old_line
            },
            old_count,
            if new_count == 0 {
                new_line - 1
            } else {
                new_line
            },
            new_count
        );
        for e in slice {
            match e {
                Edit::Keep(l) => text.push_str(&format!(" {l}\n")),
                Edit::Delete(l) => text.push_str(&format!("-{l}\n")),
                Edit::Insert(l) => text.push_str(&format!("+{l}\n")),
            }
        }
        out.push(text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_files_have_no_diff() {
        assert_eq!(unified("a", Some("x\n"), "b", Some("x\n")), "");
    }

    #[test]
    fn one_changed_line_in_the_middle() {
        let old = "1\n2\n3\n4\n5\n6\n7\n8\n9\n";
        let new = "1\n2\n3\n4\nfive\n6\n7\n8\n9\n";
        let d = unified("/etc/f", Some(old), "/etc/f", Some(new));
        assert_eq!(
            d,
            "--- /etc/f\n+++ /etc/f\n@@ -2,7 +2,7 @@\n 2\n 3\n 4\n-5\n+five\n 6\n 7\n 8\n"
        );
    }

    #[test]
    fn created_file_diffs_against_dev_null() {
        let d = unified("/etc/x", None, "/etc/x", Some("a\nb\n"));
        assert_eq!(d, "--- /dev/null\n+++ /etc/x\n@@ -0,0 +1,2 @@\n+a\n+b\n");
        let d = unified("/etc/x", Some("a\n"), "/etc/x", None);
        assert_eq!(d, "--- /etc/x\n+++ /dev/null\n@@ -1,1 +0,0 @@\n-a\n");
    }

    #[test]
    fn distant_changes_make_separate_hunks() {
        let old: String = (1..=20).map(|i| format!("{i}\n")).collect();
        let new: String = (1..=20)
            .map(|i| match i {
                2 => "two\n".to_string(),
                19 => "nineteen\n".to_string(),
                _ => format!("{i}\n"),
            })
            .collect();
        let d = unified("f", Some(&old), "f", Some(&new));
        assert_eq!(d.matches("@@ -").count(), 2, "{d}");
    }
}
