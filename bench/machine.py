"""Machine details for RESULTS.md: what the figures were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def _first(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _cmd(*argv: str) -> str:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "unknown"


def details(repo: Path) -> dict:
    """``nproc``, CPU model, memory, kernel, OpenSSH, distribution, load, commit."""
    mem_kib = _first("/proc/meminfo", "MemTotal").split()[0]
    try:
        mem = f"{int(mem_kib) / 1024 / 1024:.1f} GiB"
    except ValueError:
        mem = "unknown"
    commit = _cmd("git", "-C", str(repo), "rev-parse", "--short", "HEAD")
    # RESULTS.md itself (rewritten by the previous run) does not count as a change to the code.
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no",
                            "--", ".", ":(exclude)bench/RESULTS.md"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _first("/proc/cpuinfo", "model name"),
        "memory": mem,
        "kernel": platform.release(),
        "openssh": _cmd("ssh", "-V"),
        "os": _os_release(),
        "python": platform.python_version(),
        "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }
