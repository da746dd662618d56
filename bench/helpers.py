"""Helper benchmarks (issue 7, part 2): the AuthorizedKeysCommand and the NSS lookup of a
composite login, against a large generated configuration (``genconfig.py``).

Both helpers answer from the configuration's lookup index (``kmsbastion index``, see
``src/config/index.rs``), which is built with the real ``kmsbastion index`` binary before
measuring; the full-parse fallback (index stale) is measured too.

* **AKC**: wall time of one ``kmsbastion-keys USER KEYTYPE KEY`` (the ``%u %t %k`` call sshd
  makes), process spawn included, spawned with ``posix_spawn`` and reaped with ``waitpid`` (no
  Python ``subprocess`` overhead). *Cold*: the first call after the binary's, the
  configuration's and the index's pages were dropped from the page cache
  (``posix_fadvise(DONTNEED)`` on those files only; nothing global; no effect on the index
  under the tmpfs /run); *warm*: the calls after it; *index stale*: the configuration's
  identity changed since the index was built, so every call parses the whole file. A
  ``/bin/true`` spawn is measured the same way as the floor any AKC pays.
* **NSS**: ``_nss_kmsbastion_getpwnam_r`` of ``libnss_kmsbastion.so`` called in-process
  through ctypes, one call per sample, timed with ``perf_counter_ns``. The module reads only
  ``/etc/kmsbastion/kmsbastion.toml`` (the namespace's private /etc), so this runs inside
  ``tests/ns/run-in-ns``. *Cold*: the first lookup after the file changed and its index was
  rebuilt (what the first lookup of a freshly started process does: verify the index, decode
  the records); *cold, index stale*: the first lookup after a change without a rebuild (the
  module parses the whole file); *warm*: repeated lookups. glibc's ``getpwnam`` through
  nsswitch.conf (``passwd: files kmsbastion``) is reported too, when the module is installed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional

import genconfig
from stats import Samples

NSS_CONFIG = Path("/etc/kmsbastion/kmsbastion.toml")
NSS_STATUS_SUCCESS = 1
#: ``config::index::INDEX_DIR``.
INDEX_DIR = Path("/run/kmsbastion/index")


def index_path(config: Path) -> Path:
    """The index file of ``config`` (``config::index::index_path``)."""
    import hashlib

    digest = hashlib.sha256(os.path.abspath(config).encode()).hexdigest()
    return INDEX_DIR / f"{digest[:16]}.idx"


def build_index(kmsbastion: Path, config: Path) -> str:
    """``kmsbastion --config CONFIG index`` (the real binary, as root); returns its line."""
    r = subprocess.run([str(kmsbastion), "--config", str(config), "index"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"kmsbastion index failed (exit {r.returncode}): {r.stdout}{r.stderr}")
    return r.stdout.strip()


def index_fresh(kmsbastion: Path, config: Path) -> bool:
    """``kmsbastion --config CONFIG index --check`` exits 0."""
    r = subprocess.run([str(kmsbastion), "--config", str(config), "index", "--check"],
                       capture_output=True, text=True, timeout=60)
    return r.returncode == 0


def _drop_cache(path: Path) -> None:
    """Evicts one file's pages from the page cache (no effect on tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _spawn_wait(argv: list[str], devnull: int) -> tuple[float, int]:
    """Spawns argv with stdin/stdout/stderr on /dev/null; returns (seconds, exit status)."""
    actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
               (os.POSIX_SPAWN_DUP2, devnull, 2)]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C"}
    t0 = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    _, status = os.waitpid(pid, 0)
    return time.perf_counter() - t0, os.waitstatus_to_exitcode(status)


def bench_akc(keys_bin: Path, config: Path, user: str, key: str, min_runs: int = 7,
              max_runs: int = 50, budget_s: float = 60.0, evict: tuple = ()) -> dict:
    """AKC cold/warm wall times and the /bin/true floor. Checks the output first: the
    probe login must receive its key, else the figure would time a refusal. ``evict``: more
    files (the index) dropped from the page cache before each cold call."""
    key_type, key_b64 = key.split()[:2]
    argv = [str(keys_bin), "--config", str(config), user, key_type, key_b64]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or key_b64 not in r.stdout:
        raise RuntimeError(f"kmsbastion-keys did not authorize {user} (exit {r.returncode}): "
                           f"{r.stdout[-300:]}{r.stderr[-600:]}")
    out = {"argv": " ".join(argv[:4] + [key_type, key_b64[:12] + "…"]), "output": r.stdout.strip()}
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        floor = Samples("spawn /bin/true")
        for _ in range(50):
            floor.values.append(_spawn_wait(["/bin/true"], devnull)[0])
        cold = Samples("akc cold")
        warm = Samples("akc warm")
        started = time.monotonic()
        # Cold samples: evict binary + config, then one call; then warm calls.
        for i in range(3):
            for p in (keys_bin, config, *evict):
                _drop_cache(p)
            t, rc = _spawn_wait(argv, devnull)
            if rc != 0:
                raise RuntimeError(f"kmsbastion-keys exited {rc} (cold)")
            cold.values.append(t)
            for _ in range(max(1, min_runs // 3)):
                t, rc = _spawn_wait(argv, devnull)
                warm.values.append(t)
        while len(warm.values) < max_runs and time.monotonic() - started < budget_s:
            t, rc = _spawn_wait(argv, devnull)
            warm.values.append(t)
    finally:
        os.close(devnull)
    out.update(floor=floor, cold=cold, warm=warm)
    return out


class _Passwd(ctypes.Structure):
    _fields_ = [("pw_name", ctypes.c_char_p), ("pw_passwd", ctypes.c_char_p),
                ("pw_uid", ctypes.c_uint), ("pw_gid", ctypes.c_uint),
                ("pw_gecos", ctypes.c_char_p), ("pw_dir", ctypes.c_char_p),
                ("pw_shell", ctypes.c_char_p)]


class NssModule:
    """``libnss_kmsbastion.so`` loaded into this process."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.fn = self.lib._nss_kmsbastion_getpwnam_r
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Passwd), ctypes.c_char_p,
                            ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
        self.pw = _Passwd()
        self.buf = ctypes.create_string_buffer(4096)
        self.err = ctypes.c_int(0)

    def getpwnam(self, name: bytes) -> tuple[int, Optional[_Passwd]]:
        status = self.fn(name, ctypes.byref(self.pw), self.buf, len(self.buf), ctypes.byref(self.err))
        return status, (self.pw if status == NSS_STATUS_SUCCESS else None)

    def timed(self, name: bytes) -> tuple[float, int]:
        fn, pw, buf, n, err = self.fn, ctypes.byref(self.pw), self.buf, len(self.buf), ctypes.byref(self.err)
        t0 = time.perf_counter_ns()
        status = fn(name, pw, buf, n, err)
        return (time.perf_counter_ns() - t0) / 1e9, status


def _touch(path: Path, bump: int) -> None:
    """Changes the file's identity (mtime, and so ctime) so the module's cache and the index
    see a new file. Backwards: an mtime in the future would hold up `kmsbastion index`, which
    waits until the newest timestamp has settled."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - bump * 1_000_000_000))


def bench_nss(nss_lib: Path, kmsbastion: Path, config_text: str, login: str, uid: int,
              cold_runs: int = 5, warm_runs: int = 2000, budget_s: float = 60.0) -> dict:
    """NSS cold/warm per-call times of ``getpwnam_r(login)`` with ``config_text`` installed
    at the module's fixed path and its index built. Leaves the file in place (the caller
    removes it)."""
    if os.environ.get("KMSB_NS") != "1":
        raise RuntimeError("the NSS benchmark writes /etc/kmsbastion: run it inside tests/ns/run-in-ns")
    NSS_CONFIG.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    NSS_CONFIG.write_text(config_text)
    os.chmod(NSS_CONFIG, 0o644)
    build_index(kmsbastion, NSS_CONFIG)
    m = NssModule(nss_lib)
    name = login.encode()
    status, pw = m.getpwnam(name)
    if status != NSS_STATUS_SUCCESS or pw is None or pw.pw_uid != uid:
        raise RuntimeError(f"_nss_kmsbastion_getpwnam_r({login}) = {status} (errno {m.err.value}); "
                           f"expected SUCCESS with uid {uid}")
    entry = (f"{pw.pw_name.decode()}:{pw.pw_passwd.decode()}:{pw.pw_uid}:{pw.pw_gid}:"
             f"{pw.pw_gecos.decode()}:{pw.pw_dir.decode()}:{pw.pw_shell.decode()}")
    cold = Samples("nss cold (index)")
    stale = Samples("nss cold, index stale (full parse)")
    warm = Samples("nss warm")
    miss = Samples("nss warm, unknown name")
    started = time.monotonic()
    for i in range(cold_runs):
        # A new identity, then the index rebuilt for it: the module verifies and reads it.
        _touch(NSS_CONFIG, i + 1)
        build_index(kmsbastion, NSS_CONFIG)
        # Not the builder process's exit: on two cores its teardown would be timed too.
        time.sleep(0.2)
        t, status = m.timed(name)
        if status != NSS_STATUS_SUCCESS:
            raise RuntimeError(f"cold lookup failed with status {status}")
        cold.values.append(t)
        if time.monotonic() - started > budget_s and len(cold.values) >= 3:
            break
    # Then new identities without a rebuild: the index is stale, the module parses the file.
    # (After the indexed samples: the first lookup after a change also frees what the module
    # held before, and a whole parsed file takes milliseconds to free.)
    for i in range(3):
        _touch(NSS_CONFIG, cold_runs + i + 1)
        t, status = m.timed(name)
        if status != NSS_STATUS_SUCCESS:
            raise RuntimeError(f"cold lookup (stale index) failed with status {status}")
        stale.values.append(t)
    _touch(NSS_CONFIG, cold_runs + 4)
    build_index(kmsbastion, NSS_CONFIG)
    m.timed(name)
    for _ in range(warm_runs):
        t, status = m.timed(name)
        warm.values.append(t)
    for _ in range(min(warm_runs, 500)):
        miss.values.append(m.timed(b"nosuchuser@root@app-0001")[0])
    return {"entry": entry, "cold": cold, "stale": stale, "warm": warm, "miss": miss}


def bench_glibc_getpwnam(login: str, runs: int = 500) -> Optional[Samples]:
    """``pwd.getpwnam`` through glibc and nsswitch.conf (``files`` first, then the module),
    if the module is installed; None otherwise."""
    import pwd

    try:
        pwd.getpwnam(login)
    except KeyError:
        return None
    s = Samples("glibc getpwnam (files, kmsbastion)")
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        pwd.getpwnam(login)
        s.values.append((time.perf_counter_ns() - t0) / 1e9)
    return s


def run(release: Path, workdir: Path, log=print) -> dict:
    """Generates the configuration, runs both helper benchmarks; returns the results."""
    workdir.mkdir(parents=True, exist_ok=True)
    gen = genconfig.generate(shell="/usr/libexec/kmsbastion/kmsbastion-connect")
    config = workdir / "kmsbastion-large.toml"
    config.write_text(gen.text)
    log(f"helpers: generated {config} ({len(gen.text)} bytes: {gen.engineers} engineers, "
        f"{gen.hosts} hosts, {gen.grants} grants); probe login {gen.probe_login}")
    kmsbastion = release / "kmsbastion"
    index_line = build_index(kmsbastion, config)
    log(f"helpers: {index_line}")
    if not index_fresh(kmsbastion, config):
        raise RuntimeError(f"the index of {config} is not fresh right after `kmsbastion index`")
    # The binary on disk (not tmpfs), so dropping its pages makes a real cold start.
    keys_bin = release / "kmsbastion-keys"
    akc = bench_akc(keys_bin, config, gen.probe_login, gen.probe_key, evict=(index_path(config),))
    log(f"helpers: AKC median cold {akc['cold'].median * 1e3:.2f} ms, warm {akc['warm'].median * 1e3:.2f} ms "
        f"({len(akc['warm'].values)} runs; /bin/true spawn {akc['floor'].median * 1e3:.2f} ms)")
    # The same calls with the index stale: the configuration's identity changed since it was
    # built, so each call falls back to parsing the whole file.
    _touch(config, 1)
    if index_fresh(kmsbastion, config):
        raise RuntimeError("the index is still fresh after the configuration changed")
    stale = bench_akc(keys_bin, config, gen.probe_login, gen.probe_key, min_runs=3, max_runs=15,
                      budget_s=15)
    akc["stale"] = stale["warm"]
    akc["stale"].name = "akc, index stale (full-parse fallback)"
    log(f"helpers: AKC median with a stale index {akc['stale'].median * 1e3:.2f} ms")
    build_index(kmsbastion, config)
    uid = genconfig.UID_MIN + gen.engineers - 1
    nss = bench_nss(release / "libnss_kmsbastion.so", kmsbastion, gen.text, gen.probe_login, uid)
    log(f"helpers: NSS median cold {nss['cold'].median * 1e6:.1f} µs (stale index: "
        f"{nss['stale'].median * 1e3:.1f} ms), warm {nss['warm'].median * 1e6:.2f} µs")
    return {"gen": gen, "config": config, "akc": akc, "nss": nss, "index": index_line}


def small_config_akc(keys_bin: Path, config: Path, user: str, key: str) -> dict:
    """The AKC against a small configuration (the World's), for comparison."""
    return bench_akc(keys_bin, config, user, key, min_runs=30, max_runs=50, budget_s=10)


def cleanup() -> None:
    """Removes the configuration the NSS benchmark installed, and its index."""
    if os.environ.get("KMSB_NS") == "1":
        index_path(NSS_CONFIG).unlink(missing_ok=True)
        shutil.rmtree(NSS_CONFIG.parent, ignore_errors=True)
