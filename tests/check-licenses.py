#!/usr/bin/env python3
"""Fail if anything linked into a shipped binary is not under a permissive licence.

Walks `cargo metadata`'s resolved graph from the workspace crates along normal (non-dev)
dependencies for the Linux target, parses each crate's SPDX expression and requires at least
one OR-alternative made only of licences on the allow-list. GPL/LGPL/AGPL can therefore only
appear as an alternative that we do not pick (e.g. "MIT OR Apache-2.0 OR LGPL-2.1-or-later").
"""
import json
import re
import subprocess
import sys

ALLOWED = {
    "MIT", "Apache-2.0", "Apache-2.0 WITH LLVM-exception", "BSD-1-Clause", "BSD-2-Clause",
    "BSD-3-Clause", "ISC", "Unicode-3.0", "Unicode-DFS-2016", "Zlib", "Unlicense",
    "BSL-1.0", "CC0-1.0", "CDLA-Permissive-2.0", "0BSD",
}


def alternatives(expr: str):
    """Split an SPDX expression (as crates.io writes them) into AND-sets of an OR."""
    expr = expr.replace("/", " OR ")
    expr = expr.replace("(", " ").replace(")", " ")  # the forms in use are (A OR B) AND C
    if " AND " in expr and " OR " in expr:
        # (A OR B) AND C  ->  {A,C} | {B,C}
        left, _, right = expr.partition(" AND ")
        rights = [r.strip() for r in right.split(" AND ")]
        return [{a.strip(), *rights} for a in left.split(" OR ")]
    return [{t.strip() for t in alt.split(" AND ")} for alt in expr.split(" OR ")]


def main() -> int:
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--locked",
         "--filter-platform", "x86_64-unknown-linux-gnu"]))
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    todo = list(meta["workspace_members"])
    seen = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for dep in nodes[pid]["deps"]:
            if any(k["kind"] in (None, "build") for k in dep["dep_kinds"]):
                todo.append(dep["pkg"])
    bad = []
    for pid in sorted(seen):
        p = pkgs[pid]
        lic = p.get("license") or ""
        if not lic:
            bad.append(f"{p['name']} {p['version']}: no licence expression")
            continue
        if not any(alt <= ALLOWED for alt in alternatives(lic)):
            bad.append(f"{p['name']} {p['version']}: {lic}")
    if bad:
        print("check-licenses: crates without an acceptable licence:", file=sys.stderr)
        for b in bad:
            print("  " + b, file=sys.stderr)
        return 1
    print(f"check-licenses: {len(seen)} crates in shipped binaries, all permissively licensed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
