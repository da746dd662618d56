"""Real glibc against libnss_kmsbastion.so.2 (issue 3, layer 3 of DESIGN.md).

Runs inside tests/ns/run-in-ns only: it writes /etc/kmsbastion/kmsbastion.toml, which in the
namespace is a private tmpfs mounted over /etc/kmsbastion for the duration of this module (so
other test files' configuration is hidden, then restored). Nothing on the host changes.

    cargo build --release -p nss_kmsbastion
    tests/ns/run-in-ns build/venv/bin/pytest -q tests/system/test_nss.py

Black box through `getent -s kmsbastion` (glibc loads the module from LD_LIBRARY_PATH), and
white box through ctypes calls of the exported `_nss_kmsbastion_*` functions for status codes,
errno values and buffer sizes that getent cannot show.
"""

import ctypes
import errno
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "target" / "release" / "libnss_kmsbastion.so"
CONF_DIR = Path("/etc/kmsbastion")
CONF = CONF_DIR / "kmsbastion.toml"

NSS_STATUS_TRYAGAIN = -2
NSS_STATUS_UNAVAIL = -1
NSS_STATUS_NOTFOUND = 0
NSS_STATUS_SUCCESS = 1

KEY_ALICE = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHUE4uoozkbFBPowirK0yHYlemKswztNvjU3oNVO4w5z alice@laptop"
KEY_BOB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP36NZaAktT/Ah4ZkjYHditRvfZnjuyO7LokpbDPfpgo bob"
HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMtAgrpxiL8c1XqJROtVCZDVMf2AFKljEZHnEdb/M5j9"

SHELL = "/usr/libexec/kmsbastion/kmsbastion-connect"

CONFIG = f"""
[kms]
endpoint = "http://127.0.0.1:9100"

[bastion]
group = "kmsbastion-engineers"
gid = 64000
uid_min = 64001
uid_max = 64999

[[host]]
name = "web-01"
address = "127.0.0.2"
host_keys = ["{HOST_KEY}"]
  [[host.account]]
  name = "root"
  secret = "acs/ecs/web-01/root"
  [[host.account]]
  name = "deploy"
  secret = "acs/ecs/web-01/deploy"

[[host]]
name = "db-01"
address = "127.0.0.3"
host_keys = ["{HOST_KEY}"]
  [[host.account]]
  name = "postgres"
  secret = "acs/ecs/db-01/postgres"

[[engineer]]
name = "alice"
uid = 64001
keys = ["{KEY_ALICE}"]
groups = ["ops"]

[[engineer]]
name = "bob"
uid = 64002
keys = ["{KEY_BOB}"]

[[grant]]
groups = ["ops"]
accounts = ["root@web-01"]
"""


class Passwd(ctypes.Structure):
    _fields_ = [
        ("pw_name", ctypes.c_char_p),
        ("pw_passwd", ctypes.c_char_p),
        ("pw_uid", ctypes.c_uint),
        ("pw_gid", ctypes.c_uint),
        ("pw_gecos", ctypes.c_char_p),
        ("pw_dir", ctypes.c_char_p),
        ("pw_shell", ctypes.c_char_p),
    ]


class Group(ctypes.Structure):
    _fields_ = [
        ("gr_name", ctypes.c_char_p),
        ("gr_passwd", ctypes.c_char_p),
        ("gr_gid", ctypes.c_uint),
        ("gr_mem", ctypes.POINTER(ctypes.c_char_p)),
    ]


def _require_namespace():
    if os.environ.get("KMSB_NS") != "1":
        pytest.fail("test_nss.py must run inside tests/ns/run-in-ns (KMSB_NS=1 is not set); "
                    "it writes /etc/kmsbastion and must never touch the host")


def _mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


@pytest.fixture(scope="module")
def nss():
    """Installs the module as libnss_kmsbastion.so.2 in a private dir and a private
    /etc/kmsbastion (tmpfs) holding the test configuration."""
    _require_namespace()
    if not LIB.is_file():
        pytest.fail(f"{LIB} is missing: build it first (`make build` or "
                    "`cargo build --release -p nss_kmsbastion`)")
    for path, needle in (("/etc/group", "kmsbastion-engineers:"), ("/etc/group", ":64000:")):
        if needle in Path(path).read_text():
            pytest.fail(f"{path} already has {needle!r}: the namespace's /etc is not clean")
    libdir = Path(tempfile.mkdtemp(prefix="kmsb-nss-"))
    os.chmod(libdir, 0o755)
    shutil.copy(LIB, libdir / "libnss_kmsbastion.so.2")
    CONF_DIR.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "kmsb-nss-test", str(CONF_DIR)], check=True)
    try:
        CONF.write_text(CONFIG)
        CONF.chmod(0o644)
        lib = ctypes.CDLL(str(libdir / "libnss_kmsbastion.so.2"))
        yield Nss(libdir, lib)
    finally:
        subprocess.run(["umount", str(CONF_DIR)], check=True)
        shutil.rmtree(libdir, ignore_errors=True)


class Nss:
    def __init__(self, libdir, lib):
        self.libdir = libdir
        self.lib = lib
        for fn in ("getpwnam_r", "getgrnam_r"):
            getattr(lib, "_nss_kmsbastion_" + fn).restype = ctypes.c_int
        self.lib._nss_kmsbastion_getpwnam_r.argtypes = [
            ctypes.c_char_p, ctypes.POINTER(Passwd), ctypes.c_char_p, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_int)]
        self.lib._nss_kmsbastion_getpwuid_r.argtypes = [
            ctypes.c_uint, ctypes.POINTER(Passwd), ctypes.c_char_p, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_int)]
        self.lib._nss_kmsbastion_getgrnam_r.argtypes = [
            ctypes.c_char_p, ctypes.POINTER(Group), ctypes.c_char_p, ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_int)]
        self.lib._nss_kmsbastion_getpwent_r.argtypes = [
            ctypes.POINTER(Passwd), ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)]
        self.lib._nss_kmsbastion_setpwent.argtypes = [ctypes.c_int]
        self.lib._nss_kmsbastion_initgroups_dyn.argtypes = [
            ctypes.c_char_p, ctypes.c_uint, ctypes.POINTER(ctypes.c_long),
            ctypes.POINTER(ctypes.c_long), ctypes.POINTER(ctypes.POINTER(ctypes.c_uint)),
            ctypes.c_long, ctypes.POINTER(ctypes.c_int)]

    def getent(self, *args, service="kmsbastion", user=None):
        env = dict(os.environ, LD_LIBRARY_PATH=str(self.libdir))
        return subprocess.run(["getent", "-s", service, "--", *args], env=env, capture_output=True,
                              text=True, timeout=10, user=user)

    def getpwnam(self, name: bytes, buflen=1024):
        pw = Passwd()
        buf = ctypes.create_string_buffer(buflen)
        err = ctypes.c_int(0)
        st = self.lib._nss_kmsbastion_getpwnam_r(name, ctypes.byref(pw), buf, buflen, ctypes.byref(err))
        pw.keepalive = buf  # the strings live in buf
        return st, err.value, pw

    def getgrnam(self, name: bytes, buflen=1024):
        gr = Group()
        buf = ctypes.create_string_buffer(buflen)
        err = ctypes.c_int(0)
        st = self.lib._nss_kmsbastion_getgrnam_r(name, ctypes.byref(gr), buf, buflen, ctypes.byref(err))
        gr.keepalive = buf  # the strings and gr_mem live in buf
        members = []
        if st == NSS_STATUS_SUCCESS:
            i = 0
            while gr.gr_mem[i] is not None:
                members.append(gr.gr_mem[i])
                i += 1
        return st, err.value, gr, members


def fields(line):
    return line.rstrip("\n").split(":")


# --- passwd -------------------------------------------------------------------------------

def test_plain_engineer(nss):
    r = nss.getent("passwd", "alice")
    assert r.returncode == 0, r.stderr
    assert fields(r.stdout) == ["alice", "*", "64001", "64000", "kmsbastion alice", "/", SHELL]


def test_composite_login(nss):
    r = nss.getent("passwd", "alice@root@web-01")
    assert r.returncode == 0, r.stderr
    assert fields(r.stdout) == ["alice@root@web-01", "*", "64001", "64000",
                                "kmsbastion alice -> root@web-01", "/", SHELL]
    # existence only: bob has no grant for postgres@db-01 but the entry resolves (AKC/PAM
    # enforce the grant)
    r = nss.getent("passwd", "bob@postgres@db-01")
    assert r.returncode == 0 and fields(r.stdout)[2] == "64002"


@pytest.mark.parametrize("name", [
    "carol", "carol@root@web-01", "alice@admin@web-01", "alice@root@web-02", "alice@root",
    "alice@root@web-01@x", "root", "ALICE",
])
def test_unknown_names_exit_2(nss, name):
    r = nss.getent("passwd", name)
    assert (r.returncode, r.stdout) == (2, ""), r


def test_by_uid(nss):
    r = nss.getent("passwd", "64002")
    assert r.returncode == 0
    assert fields(r.stdout)[0] == "bob"
    assert nss.getent("passwd", "64003").returncode == 2
    assert nss.getent("passwd", "0").returncode == 2


def test_enumeration_lists_only_plain_engineers(nss):
    r = nss.getent("passwd")
    assert r.returncode == 0
    assert [fields(l)[0] for l in r.stdout.splitlines()] == ["alice", "bob"]


# --- group / initgroups ---------------------------------------------------------------------

def test_group_by_name_gid_and_enumeration(nss):
    for key in ("kmsbastion-engineers", "64000"):
        r = nss.getent("group", key)
        assert r.returncode == 0, key
        assert fields(r.stdout) == ["kmsbastion-engineers", "*", "64000", "alice,bob"]
    assert nss.getent("group", "root").returncode == 2
    assert nss.getent("group", "64001").returncode == 2
    r = nss.getent("group")
    assert r.stdout.splitlines() == ["kmsbastion-engineers:*:64000:alice,bob"]


def test_initgroups(nss):
    for user in ("alice", "alice@root@web-01"):
        r = nss.getent("initgroups", user)
        assert r.returncode == 0, user
        assert r.stdout.split() == [user, "64000"]
    r = nss.getent("initgroups", "carol")
    assert r.stdout.split() in ([], ["carol"])


def test_initgroups_dyn_grows_array(nss):
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    arr = ctypes.cast(libc.malloc(4), ctypes.POINTER(ctypes.c_uint))
    arr[0] = 100
    start, size = ctypes.c_long(1), ctypes.c_long(1)
    groups = ctypes.pointer(arr)
    err = ctypes.c_int(0)
    f = nss.lib._nss_kmsbastion_initgroups_dyn
    st = f(b"alice", 100, ctypes.byref(start), ctypes.byref(size), groups, 0, ctypes.byref(err))
    assert st == NSS_STATUS_SUCCESS
    assert (start.value, size.value) == (2, 2)
    assert [groups.contents[0], groups.contents[1]] == [100, 64000]
    st = f(b"carol", 100, ctypes.byref(start), ctypes.byref(size), groups, 0, ctypes.byref(err))
    assert st == NSS_STATUS_NOTFOUND and start.value == 2
    libc.free(ctypes.cast(groups.contents, ctypes.c_void_p))


# --- hostile names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "alice\n", "alice@root@web-01\nroot:x:0:0::/:/bin/sh", "alice@root@../etc", "../../etc/passwd",
    "alice@root@web-01/..", "%s%s%s%n", "alice%", "alice:x", " alice", "alice\t",
    "a" * 129, "alice@root@" + "w" * 5000, "alice@@web-01", "-alice", "alicé",
])
def test_hostile_names_via_getent(nss, name):
    r = nss.getent("passwd", name)
    assert (r.returncode, r.stdout) == (2, ""), name


@pytest.mark.parametrize("raw", [
    b"alice@root@web-01\n", b"alice@root@web-01:", b"\xff\xfe", b"alice@root@" + b"w" * 100_000,
    b"%n%n%n%n", b"../alice", b"",
])
def test_hostile_names_via_ctypes(nss, raw):
    st, err, _ = nss.getpwnam(raw)
    assert st == NSS_STATUS_NOTFOUND, raw


def test_embedded_nul_only_sees_the_c_string(nss):
    # C strings end at the NUL: the module sees "alice" and must return exactly that name,
    # never anything built from the bytes after it.
    st, _, pw = nss.getpwnam(b"alice\0@root@web-01")
    assert st == NSS_STATUS_SUCCESS
    assert pw.pw_name == b"alice"
    st, _, _ = nss.getpwnam(b"\0alice")
    assert st == NSS_STATUS_NOTFOUND


# --- buffers ------------------------------------------------------------------------------------

def test_small_buffer_is_tryagain_erange_then_success(nss):
    st, err, _ = nss.getpwnam(b"alice@root@web-01", buflen=16)
    assert (st, err) == (NSS_STATUS_TRYAGAIN, errno.ERANGE)
    st, err, pw = nss.getpwnam(b"alice@root@web-01", buflen=4096)
    assert st == NSS_STATUS_SUCCESS
    assert (pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_shell) == (
        b"alice@root@web-01", 64001, 64000, SHELL.encode())
    # exactly-fitting boundary: every size below the need is ERANGE, the need succeeds
    need = sum(len(s) + 1 for s in (b"alice", b"*", b"kmsbastion alice", b"/", SHELL.encode()))
    assert nss.getpwnam(b"alice", buflen=need - 1)[:2] == (NSS_STATUS_TRYAGAIN, errno.ERANGE)
    assert nss.getpwnam(b"alice", buflen=need)[0] == NSS_STATUS_SUCCESS
    assert nss.getpwnam(b"alice", buflen=0)[:2] == (NSS_STATUS_TRYAGAIN, errno.ERANGE)


def test_small_group_buffer(nss):
    st, err, _, _ = nss.getgrnam(b"kmsbastion-engineers", buflen=24)
    assert (st, err) == (NSS_STATUS_TRYAGAIN, errno.ERANGE)
    st, _, gr, members = nss.getgrnam(b"kmsbastion-engineers", buflen=1024)
    assert st == NSS_STATUS_SUCCESS
    assert (gr.gr_name, gr.gr_gid, members) == (b"kmsbastion-engineers", 64000, [b"alice", b"bob"])


def test_enumeration_retries_same_entry_after_erange(nss):
    f = nss.lib._nss_kmsbastion_getpwent_r
    assert nss.lib._nss_kmsbastion_setpwent(0) == NSS_STATUS_SUCCESS
    pw, err = Passwd(), ctypes.c_int(0)
    small = ctypes.create_string_buffer(8)
    assert f(ctypes.byref(pw), small, 8, ctypes.byref(err)) == NSS_STATUS_TRYAGAIN
    assert err.value == errno.ERANGE
    names = []
    big = ctypes.create_string_buffer(1024)
    while f(ctypes.byref(pw), big, 1024, ctypes.byref(err)) == NSS_STATUS_SUCCESS:
        names.append(pw.pw_name)
    assert names == [b"alice", b"bob"]
    assert err.value == errno.ENOENT
    nss.lib._nss_kmsbastion_endpwent()


def test_glibc_retries_with_bigger_buffer(nss):
    # A composite name with long parts: glibc's first buffer guess may be small; getent must
    # still print the full entry (glibc doubles the buffer on TRYAGAIN/ERANGE).
    r = nss.getent("passwd", "alice@deploy@web-01")
    assert r.returncode == 0 and fields(r.stdout)[0] == "alice@deploy@web-01"


# --- configuration unavailable -------------------------------------------------------------------

def _with_config(text=None, mode=0o644):
    """Context: replace the configuration (None = remove it), restore afterwards."""
    class Ctx:
        def __enter__(self):
            if text is None:
                CONF.unlink()
            else:
                CONF.write_text(text)
                CONF.chmod(mode)

        def __exit__(self, *exc):
            CONF.write_text(CONFIG)
            CONF.chmod(0o644)
    return Ctx()


def test_missing_config_is_unavail_enoent(nss):
    with _with_config(None):
        st, err, _ = nss.getpwnam(b"alice")
        assert (st, err) == (NSS_STATUS_UNAVAIL, errno.ENOENT)
        assert nss.getent("passwd", "alice").returncode == 2
        # UNAVAIL lets glibc go on to `files`; NOTFOUND with [NOTFOUND=return] would stop
        r = nss.getent("passwd", "root", service="kmsbastion [NOTFOUND=return] files")
        assert r.returncode == 0 and r.stdout.startswith("root:")
    # and back to normal once the file is back
    assert nss.getpwnam(b"alice")[0] == NSS_STATUS_SUCCESS


def test_notfound_is_not_unavail(nss):
    r = nss.getent("passwd", "root", service="kmsbastion [NOTFOUND=return] files")
    assert r.returncode == 2
    st, err, _ = nss.getpwnam(b"root")
    assert st == NSS_STATUS_NOTFOUND


@pytest.mark.parametrize("broken", [
    "[bastion]\ngid = 64000\nunknown_key = 1\n",
    "this is not toml",
    CONFIG.replace("uid = 64002", "uid = 1"),
    CONFIG.replace('accounts = ["root@web-01"]', 'accounts = ["root@nowhere"]'),
])
def test_invalid_config_is_unavail_eio(nss, broken):
    with _with_config(broken):
        st, err, _ = nss.getpwnam(b"alice")
        assert (st, err) == (NSS_STATUS_UNAVAIL, errno.EIO)
        st, err, _, _ = nss.getgrnam(b"kmsbastion-engineers")
        assert (st, err) == (NSS_STATUS_UNAVAIL, errno.EIO)
        assert nss.lib._nss_kmsbastion_setpwent(0) == NSS_STATUS_UNAVAIL
        r = nss.getent("passwd", "root", service="kmsbastion [NOTFOUND=return] files")
        assert r.returncode == 0


def test_unreadable_config_is_unavailable_for_other_users(nss):
    os.chmod(nss.libdir, 0o755)
    with _with_config(CONFIG, mode=0o600):
        r = nss.getent("passwd", "alice", user="nobody")
        assert r.returncode == 2
        r = nss.getent("passwd", "root", service="kmsbastion [NOTFOUND=return] files", user="nobody")
        assert r.returncode == 0, "an unreadable configuration must be UNAVAIL, not NOTFOUND"
    r = nss.getent("passwd", "alice", user="nobody")
    assert r.returncode == 0


def test_local_uid_in_range_makes_it_unavailable(nss):
    passwd = Path("/etc/passwd")
    saved = passwd.read_text()
    try:
        passwd.write_text(saved + "squatter:x:64500:64500::/nonexistent:/usr/sbin/nologin\n")
        st, err, _ = nss.getpwnam(b"alice")
        assert (st, err) == (NSS_STATUS_UNAVAIL, errno.EIO)
    finally:
        passwd.write_text(saved)
    assert nss.getpwnam(b"alice")[0] == NSS_STATUS_SUCCESS


def test_config_changes_are_picked_up(nss):
    with _with_config(CONFIG.replace('name = "bob"', 'name = "robert"')):
        assert nss.getpwnam(b"robert")[0] == NSS_STATUS_SUCCESS
        assert nss.getpwnam(b"bob")[0] == NSS_STATUS_NOTFOUND
    assert nss.getpwnam(b"bob")[0] == NSS_STATUS_SUCCESS


def test_lookup_is_fast(nss):
    nss.getpwnam(b"alice@root@web-01")  # warm the cache
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        st, _, _ = nss.getpwnam(b"alice@root@web-01")
    per_call = (time.perf_counter() - t0) / n
    assert st == NSS_STATUS_SUCCESS
    print(f"\nNSS getpwnam_r (cached, via ctypes): {per_call * 1e6:.1f} us per lookup")
    assert per_call < 0.001, f"{per_call * 1e6:.0f} us per lookup"
