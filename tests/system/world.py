"""A complete kmsbastion deployment on one machine, for the system tests, the lab and the bench.

A ``World`` builds, inside the private namespaces of ``tests/ns/run-in-ns`` (it refuses to run
anywhere else), everything a real deployment has:

* the **KMS emulator** (``target/release/examples/kms-emulator``) with an AccessKey pair, a
  state directory and a rotation hook that plays Cloud Assistant (it applies a rotated SSH
  public key or password to the target);
* two **target hosts**, each a stock ``sshd`` in its own mount namespace (private ``/tmp`` and
  home, so a command that runs "on the target" leaves its traces there and not on the jump
  host): ``web-01`` at 127.0.0.2:22 (``root``, public key only, an RSA-2048 PEM key pair made
  with ``ssh-keygen`` like ECS secrets) and ``web-02`` at 127.0.0.3:22 (``deploy``, password
  only);
* the **jump host**: ``sshd`` at 127.0.0.1:22 (and 10.0.0.1:22, a "foreign" network for source
  address tests) with the shipped drop-in (``packaging/sshd_config.d/``), the shipped PAM lines
  (``packaging/pam.d/``), ``libnss_kmsbastion.so.2`` in ``/etc/nsswitch.conf``,
  ``/etc/kmsbastion/kmsbastion.toml`` written from the inventory below, the ``kmsbastion``
  system user, a local admin account, and the release binaries under ``/run/kmsbastion-bin``
  (sshd accepts an AuthorizedKeysCommand only on a root-owned path without writable
  components; ``/run`` is the namespace's private tmpfs);
* the **secret administrator**: ECS secrets created in the emulator over the signed API
  (ACS3-HMAC-SHA256, the official SDKs' default), rotation, deletion, restore, fault injection
  and call statistics (:class:`KmsAdmin`);
* a private ``/dev`` view with a **syslog socket** (the namespace has no ``/dev/log``, and the
  host's devtmpfs must not get one): sshd's PAM stack, the PAM module, the broker and the
  AuthorizedKeysCommand log there, into ``<log dir>/syslog.log`` (:attr:`World.syslog`);
* **engineers** with their own ed25519 client keys: ``alice`` (root@web-01 and deploy@web-02
  from 127.0.0.0/8), ``bob`` (no grant), ``carol`` (grant expired), ``dave`` (only from
  10.0.0.0/8).

Typical use (inside the namespace)::

    with World() as w:
        r = w.ssh(w.login("alice", "web-01"), "id -un")
        assert r.stdout == "root\\n"

Everything lives under ``root_dir`` (default ``/run/kmsb-world``) and ``log_dir`` (default
``/tmp/kmsb-logs``, which ``run-in-ns --keep DIR`` copies out): one log file per daemon, the
audit log, the emulator's state. Daemons are killed by pid on :meth:`World.stop`; the pid
namespace kills anything left when the runner exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import json
import os
import pwd
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
RELEASE_DIR = REPO / "target" / "release"
PACKAGING = REPO / "packaging"
DROP_IN = PACKAGING / "sshd_config.d" / "kmsbastion.conf"
PAM_SNIPPET = PACKAGING / "pam.d" / "kmsbastion"

#: Where the release binaries and the PAM module are installed inside the namespace.
BIN_DIR = Path("/run/kmsbastion-bin")
#: Where ``libnss_kmsbastion.so.2`` is installed (listed in ld.so.conf.d).
LIB_DIR = Path("/run/kmsbastion-lib")
#: The production install path the shipped snippets name; rewritten to BIN_DIR here.
SHIPPED_LIBEXEC = "/usr/libexec/kmsbastion/"
#: The broker's socket directory (``[bastion] runtime_dir``).
RUNTIME_DIR = Path("/run/kmsbastion")
ETC_DIR = Path("/etc/kmsbastion")
CONFIG_PATH = ETC_DIR / "kmsbastion.toml"
CREDENTIALS_PATH = ETC_DIR / "credentials"

BINARIES = ("kmsbastion-keys", "kmsbastion-broker", "kmsbastion-connect", "kmsbastion")
NSS_LIB = "libnss_kmsbastion.so"
PAM_LIB = "libpam_kmsbastion.so"
EMULATOR = "examples/kms-emulator"

SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"

JUMP_ADDR = "127.0.0.1"
#: A second address of the jump host on a "foreign" network (10.0.0.0/8) ...
JUMP_FOREIGN_ADDR = "10.0.0.1"
#: ... and a client address on that network, for ``bind_address``.
FOREIGN_CLIENT_ADDR = "10.0.0.5"

BASTION_GROUP = "kmsbastion-engineers"
BASTION_GID = 64000
SERVICE_USER = "kmsbastion"
REGION = "cn-hangzhou"


class WorldError(RuntimeError):
    """Setting up or driving the world failed; the message says what and where to look."""


class KmsApiError(RuntimeError):
    """A KMS API call returned an error: ``code`` (e.g. ``Forbidden.ResourceNotFound``),
    ``status`` (HTTP), ``request_id``."""

    def __init__(self, code: str, status: int, message: str, request_id: str | None):
        super().__init__(f"KMS {code} (HTTP {status}): {message} [RequestId {request_id}]")
        self.code = code
        self.status = status
        self.request_id = request_id


# --------------------------------------------------------------------------------------------
# The secret administrator's console: a signed KMS client, plus the emulator's admin endpoints.
# --------------------------------------------------------------------------------------------


def _pct(value: str) -> str:
    """RFC 3986 percent-encoding as the KMS signatures use it (`~` kept, space as %20)."""
    return urllib.parse.quote(value, safe="~")


class KmsAdmin:
    """A minimal KMS API client (ACS3-HMAC-SHA256, API 2016-01-20) for the secret
    administrator's side, plus the emulator's unsigned ``/__admin`` endpoints.

    Every method returns the decoded JSON response or raises :class:`KmsApiError`.
    """

    def __init__(self, endpoint: str, access_key_id: str, access_key_secret: str):
        self.endpoint = endpoint.rstrip("/")
        self.host = urllib.parse.urlsplit(self.endpoint).netloc
        self.access_key_id = access_key_id
        self._secret = access_key_secret

    # -- signed API --------------------------------------------------------------------------
    def call(self, action: str, query: dict, form: Optional[dict] = None, timeout: float = 30) -> dict:
        """Sends one signed RPC request: ``query`` in the URL, ``form`` (e.g. ``SecretData``)
        as an ``application/x-www-form-urlencoded`` body."""
        query = {k: str(v) for k, v in query.items()}
        body = urllib.parse.urlencode(sorted((form or {}).items())).encode()
        payload_hash = hashlib.sha256(body).hexdigest()
        canonical_query = "&".join(f"{_pct(k)}={_pct(v)}" for k, v in sorted(query.items()))
        headers = {
            "host": self.host,
            "x-acs-action": action,
            "x-acs-version": "2016-01-20",
            "x-acs-date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "x-acs-signature-nonce": uuid.uuid4().hex,
            "x-acs-content-sha256": payload_hash,
            "content-type": "application/x-www-form-urlencoded",
        }
        signed = sorted(headers)
        canonical_headers = "".join(f"{h}:{headers[h].strip()}\n" for h in signed)
        canonical_request = "\n".join(
            ["POST", "/", canonical_query, canonical_headers, ";".join(signed), payload_hash]
        )
        string_to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical_request.encode()).hexdigest()
        signature = hmac.new(self._secret.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"ACS3-HMAC-SHA256 Credential={self.access_key_id},"
            f"SignedHeaders={';'.join(signed)},Signature={signature}"
        )
        url = f"{self.endpoint}/" + (f"?{canonical_query}" if canonical_query else "")
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = {"Code": "NonJson", "Message": raw[:200].decode(errors="replace")}
            raise KmsApiError(doc.get("Code", "?"), e.code, doc.get("Message", ""), doc.get("RequestId")) from None

    def create_ecs_secret(
        self, name: str, secret_data: dict, sub_type: str, instance_id: str, version_id: str = "v1"
    ) -> dict:
        """CreateSecret of type ECS (``sub_type`` ``Password`` or ``SSHKey``)."""
        extended = {"SecretSubType": sub_type, "RegionId": REGION, "InstanceId": instance_id}
        return self.call(
            "CreateSecret",
            {
                "SecretName": name,
                "VersionId": version_id,
                "SecretType": "ECS",
                "ExtendedConfig": json.dumps(extended, separators=(",", ":")),
                "EnableAutomaticRotation": "false",
            },
            {"SecretData": json.dumps(secret_data, separators=(",", ":"))},
        )

    def get_secret_value(self, name: str, stage: str = "ACSCurrent") -> dict:
        """GetSecretValue of a stage (``ACSCurrent``/``ACSPrevious``)."""
        return self.call("GetSecretValue", {"SecretName": name, "VersionStage": stage, "FetchExtendedConfig": "true"})

    def rotate_secret(self, name: str, version_id: str) -> dict:
        """RotateSecret: the emulator makes a new value and runs the rotation hook; stages move
        only if the hook succeeds."""
        return self.call("RotateSecret", {"SecretName": name, "VersionId": version_id})

    def delete_secret(self, name: str, recovery_window_days: int = 7, force: bool = False) -> dict:
        """DeleteSecret: pending deletion for ``recovery_window_days``, or gone at once with
        ``force``."""
        query = {"SecretName": name}
        if force:
            query["ForceDeleteWithoutRecovery"] = "true"
        else:
            query["RecoveryWindowInDays"] = str(recovery_window_days)
        return self.call("DeleteSecret", query)

    def restore_secret(self, name: str) -> dict:
        """RestoreSecret: cancels a pending deletion."""
        return self.call("RestoreSecret", {"SecretName": name})

    def describe_secret(self, name: str) -> dict:
        """DescribeSecret (metadata only)."""
        return self.call("DescribeSecret", {"SecretName": name})

    # -- emulator admin endpoints (unsigned, loopback only) ---------------------------------
    def _admin(self, method: str, path: str, doc: Optional[dict] = None) -> dict:
        data = json.dumps(doc).encode() if doc is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(
            f"{self.endpoint}{path}", data=data, method=method, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return json.loads(raw) if raw.strip() else {}

    def add_fault(self, action: str = "GetSecretValue", code: Optional[str] = None, count: int = 1, latency_ms: int = 0) -> dict:
        """Makes the next ``count`` calls of ``action`` fail with ``code`` (or only be slow by
        ``latency_ms`` when ``code`` is None)."""
        doc = {"action": action, "count": count, "latency_ms": latency_ms}
        if code is not None:
            doc["code"] = code
        return self._admin("POST", "/__admin/faults", doc)

    def clear_faults(self) -> dict:
        """Removes every injected fault."""
        return self._admin("DELETE", "/__admin/faults")

    def stats(self) -> dict:
        """Call counters per action: ``{"calls": {"GetSecretValue": 3, ...}}``."""
        return self._admin("GET", "/__admin/stats")

    def reset_stats(self) -> dict:
        """Zeroes the call counters."""
        return self._admin("POST", "/__admin/stats/reset")


# --------------------------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One target host and its single host account, as the inventory and KMS know it."""

    name: str
    address: str
    account: str
    secret_name: str
    instance_id: str
    sub_type: str  # "SSHKey" or "Password"
    port: int = 22
    #: ``ssh-ed25519 AAAA…`` of the key the target currently serves (pinned on the jump host).
    host_key: str = ""
    #: The first ever host key (what the jump host pins).
    pinned_host_key: str = ""
    dir: Path = Path("/")
    process: Optional[subprocess.Popen] = None

    @property
    def authorized_keys(self) -> Path:
        """The harness-owned ``AuthorizedKeysFile`` of a key target."""
        return self.dir / "authorized_keys"


@dataclasses.dataclass
class Engineer:
    """An engineer in the bastion configuration, with a client key pair in the world."""

    name: str
    uid: int
    key: Path = Path("/")
    public_key: str = ""
    groups: tuple = ()


@dataclasses.dataclass
class Daemon:
    """A process the world started, with its log file."""

    name: str
    process: subprocess.Popen
    log: Path


# The rotation hook the emulator runs (via /bin/sh -c) in place of Cloud Assistant. It reads
# the new SecretData JSON on stdin and applies it to the target named by the secret; it never
# writes the value anywhere but the target's authorized_keys (public key) or chpasswd.
ROTATION_HOOK = r'''
import json, os, subprocess, sys, tempfile, time
world = sys.argv[1]
targets = json.load(open(os.path.join(world, "targets.json")))
name = os.environ.get("KMS_SECRET_NAME", "")
log = open(os.path.join(sys.argv[2], "rotation-hook.log"), "a")
def note(msg):
    log.write(time.strftime("%H:%M:%S ") + msg + "\n"); log.flush()
try:
    mode = open(os.path.join(world, "hook-mode")).read().strip() or "apply"
except FileNotFoundError:
    mode = "apply"
data = json.loads(sys.stdin.read())
meta = {k: os.environ.get(k) for k in ("KMS_SECRET_NAME", "KMS_INSTANCE_ID", "KMS_USER_NAME", "KMS_SECRET_SUBTYPE", "KMS_VERSION_ID")}
note("rotation %s mode=%s" % (json.dumps(meta, sort_keys=True), mode))
target = targets.get(name)
if target is None:
    note("unknown secret %r: refusing" % name); sys.exit(3)
if data.get("UserName") != target["account"] or os.environ.get("KMS_USER_NAME") != target["account"]:
    note("UserName mismatch for %r: refusing" % name); sys.exit(4)
if mode == "fail":
    note("failing on purpose"); sys.exit(1)
if mode == "skip":
    note("not applied (simulated rotation race)"); sys.exit(0)
if target["sub_type"] == "SSHKey":
    path = target["authorized_keys"]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        f.write(data["PublicKey"].strip() + "\n")
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)
else:
    subprocess.run(["chpasswd"], input=("%s:%s\n" % (target["account"], data["Password"])).encode(), check=True)
note("applied %s to %s" % (os.environ.get("KMS_VERSION_ID"), target["name"]))
'''


def _run(argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
    """Runs a setup command; raises WorldError with its output when it fails."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    r = subprocess.run(list(argv), **kw)
    if r.returncode != 0:
        raise WorldError(f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def _write(path: Path, text: str, mode: int = 0o644, owner: Optional[str] = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)
    if owner:
        shutil.chown(path, owner, owner)
    return path


def _mounted_at(point: str) -> Optional[str]:
    """The filesystem source mounted at ``point`` last (topmost), or None."""
    source = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4 and fields[4] == point:
            source = right.split()[1] if len(right.split()) > 1 else ""
    return source


def _wait_port(addr: str, port: int, timeout: float, proc: Optional[subprocess.Popen], what: str, log: Path) -> None:
    """Waits until ``addr:port`` sends an SSH banner (or any byte)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise WorldError(f"{what} exited with {proc.returncode} while starting; see {log}:\n{_tail(log)}")
        try:
            with socket.create_connection((addr, port), timeout=1) as s:
                if s.recv(64):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise WorldError(f"{what} did not answer on {addr}:{port} within {timeout}s; see {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ssh_keygen(path: Path, kind: str = "ed25519", comment: str = "", bits: Optional[int] = None, pem: bool = False) -> str:
    """Makes a key pair at ``path``/``path.pub`` and returns the public key line."""
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
    if bits:
        argv += ["-b", str(bits)]
    if pem:
        argv += ["-m", "PEM"]
    _run(argv)
    return Path(f"{path}.pub").read_text().strip()


class SyslogSink:
    """A minimal syslog daemon: receives datagrams on a Unix socket and appends them, one per
    line with a receive timestamp, to a file (``lines()`` reads them back)."""

    def __init__(self, socket_path: Path, out: Path):
        self.socket_path = socket_path
        self.out = out
        self._sock: Optional[socket.socket] = None
        self._stop = threading.Event()

    def start(self) -> "SyslogSink":
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)
        self._sock.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True, name="syslog-sink").start()
        return self

    def _serve(self) -> None:
        with open(self.out, "a") as f:
            while not self._stop.is_set():
                try:
                    data = self._sock.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                f.write(time.strftime("%H:%M:%S ") + data.decode(errors="replace").rstrip("\n\0") + "\n")
                f.flush()

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()

    def lines(self) -> list[str]:
        """Every line received so far."""
        try:
            return self.out.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []


class World:
    """One jump host, two targets, the KMS emulator and the engineers; see the module doc.

    Args:
        root_dir: private working directory (keys, configs, the emulator's state).
        log_dir: one log per daemon, the audit log, ``rotation-hook.log``. Keep the default
            ``/tmp/kmsb-logs`` to have ``run-in-ns --keep DIR`` copy it out.
        release_dir: where ``make build`` put the binaries.
        kms_deadline_ms: ``[kms] deadline_ms`` of the bastion configuration.
    """

    def __init__(
        self,
        root_dir: os.PathLike | str = "/run/kmsb-world",
        log_dir: os.PathLike | str = "/tmp/kmsb-logs",
        release_dir: os.PathLike | str = RELEASE_DIR,
        kms_deadline_ms: int = 5000,
    ):
        self.root = Path(root_dir)
        self.log_dir = Path(log_dir)
        self.release_dir = Path(release_dir)
        self.kms_deadline_ms = kms_deadline_ms
        self.jump_addr = JUMP_ADDR
        self.jump_foreign_addr = JUMP_FOREIGN_ADDR
        self.foreign_client_addr = FOREIGN_CLIENT_ADDR
        self.audit_log = self.log_dir / "audit.log"
        self.known_hosts = self.root / "client" / "known_hosts"
        self.targets: dict[str, Target] = {
            "web-01": Target("web-01", "127.0.0.2", "root", "acs/ecs/web-01/root", "i-web01", "SSHKey"),
            "web-02": Target("web-02", "127.0.0.3", "deploy", "acs/ecs/web-02/deploy", "i-web02", "Password"),
        }
        self.engineers: dict[str, Engineer] = {
            "alice": Engineer("alice", 64001, groups=("ops",)),
            "bob": Engineer("bob", 64002),
            "carol": Engineer("carol", 64003),
            "dave": Engineer("dave", 64004),
        }
        #: The local, non-bastion admin of the jump host (own authorized_keys).
        self.admin_key = self.root / "client" / "admin_ed25519"
        self.kms: Optional[KmsAdmin] = None
        #: The /dev/log listener (see :meth:`_private_dev`); its lines are in ``syslog.log``.
        self.syslog: Optional["SyslogSink"] = None
        self.daemons: dict[str, Daemon] = {}
        self._version_seq = 1
        self._started = False

    # ---------------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------------
    def __enter__(self) -> "World":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "World":
        """Builds and starts everything; returns self. Raises WorldError on any problem."""
        if os.environ.get("KMSB_NS") != "1":
            raise WorldError("World runs only inside tests/ns/run-in-ns (KMSB_NS=1 is not set)")
        if os.geteuid() != 0:
            raise WorldError("World needs root inside the namespace")
        self._check_artifacts()
        try:
            self._private_mounts()
            for d in (self.root, self.log_dir):
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o755)
            self._private_dev()
            self._network()
            self._users()
            self._install_binaries()
            self._install_nss()
            self._make_keys()
            self._start_emulator()
            self._create_secrets()
            for t in self.targets.values():
                self._start_target(t)
            self._configure_jump()
            self._start_jump()
            self._started = True
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops every daemon the world started (SIGTERM, then SIGKILL), by pid, then puts the
        namespace's /etc back (nsswitch.conf, pam.d/sshd, /etc/kmsbastion, the ld.so entry)
        and removes ``root_dir``; the users it created stay (harmless, private /etc). The log
        directory is kept."""
        leftovers = self._descendants([d.process.pid for d in self.daemons.values()])
        for name in list(self.daemons)[::-1]:
            self._stop_daemon(name)
        # Sessions, brokers and onward ssh processes of this world (children of the daemons,
        # reparented once a listener exits): end them too, so the next world starts clean.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for pid in leftovers if Path(f"/proc/{pid}").exists()]
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if alive and sig == signal.SIGTERM:
                with contextlib.suppress(WorldError):
                    self.wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in alive), timeout=3)
        for path in (Path("/etc/nsswitch.conf"), Path("/etc/pam.d/sshd")):
            saved = self.root / "orig" / path.name
            if saved.exists():
                shutil.copyfile(saved, path)
        for path in (CONFIG_PATH, CREDENTIALS_PATH):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        ld_conf = Path("/etc/ld.so.conf.d/kmsbastion-test.conf")
        if ld_conf.exists():
            ld_conf.unlink()
            subprocess.run(["ldconfig"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.syslog is not None:
            self.syslog.stop()
            self.syslog = None
        if _mounted_at("/dev") == "kmsb-world-dev":
            subprocess.run(["umount", "-l", "/dev"], check=False)
        self._started = False

    @staticmethod
    def _descendants(roots: Iterable[int]) -> list[int]:
        """Every live descendant of ``roots`` (by parent pid), deepest last."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        out: list[int] = []
        todo = list(roots)
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out

    def _stop_daemon(self, name: str) -> None:
        d = self.daemons.pop(name, None)
        if d is None or d.process.poll() is not None:
            return
        d.process.send_signal(signal.SIGTERM)
        try:
            d.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            d.process.kill()
            d.process.wait(timeout=5)

    def _check_artifacts(self) -> None:
        missing = [p for p in self.artifacts().values() if not p.is_file()]
        missing += [p for p in (DROP_IN, PAM_SNIPPET) if not p.is_file()]
        if missing:
            raise WorldError(
                "missing build artifacts: " + ", ".join(map(str, missing)) + " (run `make build`)"
            )

    def artifacts(self) -> dict[str, Path]:
        """The release files the world installs, by name."""
        out = {b: self.release_dir / b for b in BINARIES}
        out[NSS_LIB] = self.release_dir / NSS_LIB
        out[PAM_LIB] = self.release_dir / PAM_LIB
        out["kms-emulator"] = self.release_dir / "examples" / "kms-emulator"
        return out

    # ---------------------------------------------------------------------------------------
    # setup steps
    # ---------------------------------------------------------------------------------------
    def _private_mounts(self) -> None:
        # /home and /var/log are the host's in run-in-ns: useradd creates homes, sshd writes
        # wtmp/lastlog. Give them tmpfs. (/root stays: the venv's Python may live there; the
        # clients never write to it with -F none, and each target gets a private /root.)
        for point, mode in (("/home", "0755"), ("/var/log", "0755")):
            if _mounted_at(point) != f"kmsb-world{point.replace('/', '-')}":
                _run(["mount", "-t", "tmpfs", "-o", f"mode={mode},nosuid,nodev", f"kmsb-world{point.replace('/', '-')}", point])

    def _private_dev(self) -> None:
        """Gives the namespace its own /dev with a syslog socket: sshd, the PAM module and the
        broker log to /dev/log, which the host's devtmpfs does not have (and must not get).
        A tmpfs goes over /dev; device nodes are re-created, pts/shm (and other mounts and
        directories) are bind-mounted back, symlinks copied; then ``/dev/log`` is served by
        :class:`SyslogSink` into ``<log dir>/syslog.log``. :meth:`stop` lazily unmounts it."""
        if _mounted_at("/dev") == "kmsb-world-dev":
            return
        orig = Path("/run/kmsb-dev-orig")
        orig.mkdir(mode=0o755, exist_ok=True)
        _run(["mount", "--rbind", "/dev", str(orig)])
        _run(["mount", "--make-rslave", str(orig)])
        _run(["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid", "kmsb-world-dev", "/dev"])
        for entry in sorted(orig.iterdir()):
            st = entry.lstat()
            dest = Path("/dev") / entry.name
            kind = st.st_mode & 0o170000
            if kind == 0o120000:  # symlink
                os.symlink(os.readlink(entry), dest)
            elif kind == 0o040000:  # directory (pts, shm, net, …): the same thing, bound
                dest.mkdir(mode=st.st_mode & 0o7777)
                _run(["mount", "--rbind", str(entry), str(dest)])
            elif kind in (0o020000, 0o060000):  # char/block device
                os.mknod(dest, st.st_mode, st.st_rdev)
                os.chown(dest, st.st_uid, st.st_gid)
                os.chmod(dest, st.st_mode & 0o7777)
        _run(["umount", "-l", str(orig)])
        self.syslog = SyslogSink(Path("/dev/log"), self.log_dir / "syslog.log").start()

    def _network(self) -> None:
        have = _run(["ip", "-o", "addr", "show", "dev", "lo"]).stdout
        for addr in (self.jump_foreign_addr, self.foreign_client_addr):
            if f" {addr}/" not in have:
                _run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"])

    @staticmethod
    def _user_exists(name: str) -> bool:
        try:
            pwd.getpwnam(name)
            return True
        except KeyError:
            return False

    def _users(self) -> None:
        if not self._user_exists(SERVICE_USER):
            _run(["useradd", "--system", "--home-dir", "/nonexistent", "--no-create-home",
                  "--shell", "/usr/sbin/nologin", "--user-group", SERVICE_USER])
        if not self._user_exists("admin"):
            _run(["useradd", "--create-home", "--shell", "/bin/bash", "admin"])
            # An unlocked account without a usable password (key logins only).
            _run(["usermod", "-p", "*", "admin"])
        if not self._user_exists("deploy"):
            _run(["useradd", "--no-create-home", "--home-dir", "/home/deploy", "--shell", "/bin/bash", "deploy"])

    def _install_binaries(self) -> None:
        BIN_DIR.mkdir(mode=0o755, exist_ok=True)
        os.chmod(BIN_DIR, 0o755)
        arts = self.artifacts()
        for name in BINARIES:
            shutil.copyfile(arts[name], BIN_DIR / name)
            os.chmod(BIN_DIR / name, 0o755)
        shutil.copyfile(arts[PAM_LIB], BIN_DIR / "pam_kmsbastion.so")
        os.chmod(BIN_DIR / "pam_kmsbastion.so", 0o644)
        RUNTIME_DIR.mkdir(mode=0o755, exist_ok=True)

    def _install_nss(self) -> None:
        LIB_DIR.mkdir(mode=0o755, exist_ok=True)
        shutil.copyfile(self.artifacts()[NSS_LIB], LIB_DIR / "libnss_kmsbastion.so.2")
        os.chmod(LIB_DIR / "libnss_kmsbastion.so.2", 0o644)
        _write(Path("/etc/ld.so.conf.d/kmsbastion-test.conf"), f"{LIB_DIR}\n")
        _run(["ldconfig"])

    def bin(self, name: str) -> Path:
        """Installed path of a release binary (``kmsbastion-connect`` …)."""
        return BIN_DIR / name

    def _make_keys(self) -> None:
        client = self.root / "client"
        client.mkdir(mode=0o700, parents=True, exist_ok=True)
        for e in self.engineers.values():
            e.key = client / f"{e.name}_ed25519"
            if not e.key.exists():
                ssh_keygen(e.key, comment=f"{e.name}@laptop")
            e.public_key = Path(f"{e.key}.pub").read_text().strip()
        if not self.admin_key.exists():
            ssh_keygen(self.admin_key, comment="admin@laptop")
        home = Path(pwd.getpwnam("admin").pw_dir)
        _write(home / ".ssh" / "authorized_keys", Path(f"{self.admin_key}.pub").read_text(), 0o600, "admin")
        os.chmod(home / ".ssh", 0o700)
        shutil.chown(home / ".ssh", "admin", "admin")
        for t in self.targets.values():
            t.dir = self.root / t.name
            t.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = t.dir / "ssh_host_ed25519_key"
            if not key.exists():
                ssh_keygen(key, comment=f"{t.name}")
            t.host_key = " ".join(Path(f"{key}.pub").read_text().split()[:2])
            t.pinned_host_key = t.pinned_host_key or t.host_key
        jump = self.root / "jump"
        jump.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = jump / "ssh_host_ed25519_key"
        if not key.exists():
            ssh_keygen(key, comment="jump")
        pub = " ".join(Path(f"{key}.pub").read_text().split()[:2])
        _write(self.known_hosts, "".join(f"{a} {pub}\n" for a in (self.jump_addr, self.jump_foreign_addr)), 0o644)
        # Direct logins to the targets (admin checks, timings) pin their keys too.
        _write(self.root / "client" / "known_hosts_targets",
               "".join(f"{t.address} {t.host_key}\n" for t in self.targets.values()), 0o644)

    # -- KMS ---------------------------------------------------------------------------------
    def _start_emulator(self) -> None:
        state = self.root / "kms-state"
        state.mkdir(mode=0o700, exist_ok=True)
        hook = _write(self.root / "rotation-hook.py", ROTATION_HOOK, 0o755)
        self.set_rotation_hook_mode("apply")
        _write(self.root / "targets.json", json.dumps({
            t.secret_name: {"name": t.name, "account": t.account, "sub_type": t.sub_type,
                            "authorized_keys": str(self.root / t.name / "authorized_keys")}
            for t in self.targets.values()
        }, indent=1))
        self._ak_id = "LTAI" + secrets.token_hex(8)
        self._ak_secret = secrets.token_urlsafe(24)
        env = dict(os.environ, ALIBABA_CLOUD_ACCESS_KEY_ID=self._ak_id, ALIBABA_CLOUD_ACCESS_KEY_SECRET=self._ak_secret)
        log = self.log_dir / "kms-emulator.log"
        hook_cmd = f"/usr/bin/python3 {hook} {self.root} {self.log_dir}"
        argv = [str(self.artifacts()["kms-emulator"]), "--listen", "127.0.0.1:0", "--state", str(state),
                "--rotation-hook", hook_cmd]
        with open(log, "ab") as logf:
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL)
        self.daemons["kms-emulator"] = Daemon("kms-emulator", proc, log)
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        first = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
        prefix = "listening on "
        if not first.startswith(prefix):
            raise WorldError(f"kms-emulator did not report its address (got {first!r}); see {log}:\n{_tail(log)}")
        self.kms_endpoint = first[len(prefix):]

        def drain() -> None:  # keep its stdout flowing into the log
            with open(log, "ab") as f:
                for line in proc.stdout:
                    f.write(line)
                    f.flush()

        threading.Thread(target=drain, daemon=True).start()
        self.kms = KmsAdmin(self.kms_endpoint, self._ak_id, self._ak_secret)

    def set_rotation_hook_mode(self, mode: str) -> None:
        """``apply`` (default: apply the new credential to the target), ``skip`` (report
        success without applying: the rotation race) or ``fail`` (exit 1: stages stay)."""
        if mode not in ("apply", "skip", "fail"):
            raise ValueError(mode)
        _write(self.root / "hook-mode", mode + "\n")

    def _create_secrets(self) -> None:
        for t in self.targets.values():
            try:
                self.kms.describe_secret(t.secret_name)
            except KmsApiError as e:
                if e.code != "Forbidden.ResourceNotFound":
                    raise
                self.create_secret(t.name)
            self.apply_current_credential(t.name)

    def create_secret(self, target: str) -> str:
        """The secret administrator creates the target's ECS secret with a fresh credential
        (SSHKey: an RSA-2048 PKCS#1 PEM pair from ``ssh-keygen -t rsa -b 2048 -m PEM``;
        Password: a random one). Does NOT apply it to the target (see
        :meth:`apply_current_credential`). Returns the VersionId."""
        t = self.targets[target]
        scratch = self.root / "scratch"
        if t.sub_type == "SSHKey":
            # The key files exist only for the instant ssh-keygen needs; the values then live
            # in KMS alone.
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(mode=0o700)
            try:
                public = ssh_keygen(scratch / "k", "rsa", t.name, bits=2048, pem=True)
                private = (scratch / "k").read_text()
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            data = {"UserName": t.account, "PublicKey": public, "PrivateKey": private}
        else:
            data = {"UserName": t.account, "Password": "Pw-" + secrets.token_urlsafe(18)}
        version = self.next_version_id()
        self.kms.create_ecs_secret(t.secret_name, data, t.sub_type, t.instance_id, version_id=version)
        return version

    def apply_current_credential(self, target: str) -> str:
        """Makes the target accept exactly the secret's ACSCurrent credential (what a
        successful rotation hook does); returns the VersionId."""
        t = self.targets[target]
        value = self.kms.get_secret_value(t.secret_name)
        data = json.loads(value["SecretData"])
        if t.sub_type == "SSHKey":
            _write(t.authorized_keys, data["PublicKey"].strip() + "\n", 0o600)
        else:
            _run(["chpasswd"], input=f"{t.account}:{data['Password']}\n")
        return value["VersionId"]

    def next_version_id(self) -> str:
        """A fresh VersionId for RotateSecret."""
        self._version_seq += 1
        return f"v{self._version_seq}-{secrets.token_hex(3)}"

    def rotate(self, target: str, hook_mode: str = "apply") -> str:
        """Rotates the target's secret (the emulator makes a new credential and runs the hook
        in ``hook_mode``); returns the new VersionId."""
        version = self.next_version_id()
        self.set_rotation_hook_mode(hook_mode)
        try:
            self.kms.rotate_secret(self.targets[target].secret_name, version)
        finally:
            self.set_rotation_hook_mode("apply")
        return version

    def secret_values(self, target: str) -> list[dict]:
        """SecretData (decoded JSON) of ACSCurrent and, if any, ACSPrevious; for leak scans."""
        out = []
        for stage in ("ACSCurrent", "ACSPrevious"):
            try:
                out.append(json.loads(self.kms.get_secret_value(self.targets[target].secret_name, stage)["SecretData"]))
            except KmsApiError:
                pass
        return out

    @contextlib.contextmanager
    def target_sshd_with(self, target: str, lines: str):
        """Runs the target's sshd with ``lines`` put in front of its configuration (reloaded
        with SIGHUP: sshd re-executes itself with the same pid); restores the configuration
        afterwards, whatever happens. Yields the :class:`Target`."""
        t = self.targets[target]
        config = t.dir / "sshd_config"
        original = config.read_text()

        def reload():
            self.daemons[f"sshd-{target}"].process.send_signal(signal.SIGHUP)
            time.sleep(0.3)

            def banner():
                try:
                    with socket.create_connection((t.address, t.port), timeout=1) as s:
                        return s.recv(64).startswith(b"SSH-2.0-")
                except OSError:
                    return False
            self.wait_for(banner, timeout=10, what=f"sshd-{target} after reload")

        config.write_text(lines + original)
        try:
            reload()
            yield t
        finally:
            config.write_text(original)
            reload()

    def kms_stats(self) -> dict:
        """The emulator's call counters per action (``{"GetSecretValue": 3, ...}``)."""
        return self.kms.stats().get("calls", {})

    # -- targets -----------------------------------------------------------------------------
    def _target_config(self, t: Target) -> str:
        common = f"""# target {t.name}: a stock sshd, generated by tests/system/world.py
ListenAddress {t.address}:{t.port}
HostKey {t.dir}/ssh_host_ed25519_key
PidFile none
UsePAM no
LogLevel VERBOSE
PrintMotd no
PrintLastLog no
AllowUsers {t.account}
AcceptEnv LANG LC_*
# The target itself allows forwarding: the bastion is what must not ask for it.
AllowTcpForwarding yes
AllowAgentForwarding yes
X11Forwarding yes
KbdInteractiveAuthentication no
Subsystem sftp {SFTP_SERVER}
"""
        if t.sub_type == "SSHKey":
            return common + f"""PubkeyAuthentication yes
PasswordAuthentication no
PermitRootLogin prohibit-password
AuthorizedKeysFile {t.authorized_keys}
"""
        return common + """PubkeyAuthentication no
PasswordAuthentication yes
PermitEmptyPasswords no
PermitRootLogin no
"""

    def _start_target(self, t: Target) -> None:
        config = _write(t.dir / "sshd_config", self._target_config(t), 0o600)
        home = pwd.getpwnam(t.account).pw_dir
        # Its own mount namespace: private /tmp and home, so what runs "on the target" is
        # visible at /proc/<pid>/root/... and not in the jump host's /tmp.
        script = (
            "mount -t tmpfs -o mode=1777 kmsb-target-tmp /tmp && "
            f"mount -t tmpfs -o mode=0755 kmsb-target-home {os.path.dirname(home) if home != '/root' else '/root'} && "
            f"mkdir -p {home} && chown {t.account}: {home} && chmod 0700 {home} && "
            f"exec {SSHD} -D -e -f {config}"
        )
        log = self.log_dir / f"sshd-{t.name}.log"
        with open(log, "ab") as logf:
            proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script],
                                    stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t.process = proc
        self.daemons[f"sshd-{t.name}"] = Daemon(f"sshd-{t.name}", proc, log)
        _wait_port(t.address, t.port, 10, proc, f"sshd of {t.name}", log)

    def target_path(self, target: str, path: str) -> Path:
        """A path as the target sees it (its private /tmp and home), from the jump host."""
        proc = self.targets[target].process
        if proc is None or proc.poll() is not None:
            raise WorldError(f"sshd of {target} is not running")
        return Path(f"/proc/{proc.pid}/root") / path.lstrip("/")

    @contextlib.contextmanager
    def host_key_changed(self, target: str):
        """Within the block the target serves a NEW host key (the pinned one no longer
        matches); afterwards it serves the original key again."""
        t = self.targets[target]
        original = t.dir / "ssh_host_ed25519_key"
        other = t.dir / "other_host_ed25519_key"
        if not other.exists():
            ssh_keygen(other, comment=f"{t.name}-impostor")
        saved = (original.read_bytes(), Path(f"{original}.pub").read_bytes())
        self._stop_daemon(f"sshd-{t.name}")
        try:
            shutil.copyfile(other, original)
            shutil.copyfile(f"{other}.pub", f"{original}.pub")
            t.host_key = " ".join(Path(f"{original}.pub").read_text().split()[:2])
            self._start_target(t)
            yield t.host_key
        finally:
            self._stop_daemon(f"sshd-{t.name}")
            original.write_bytes(saved[0])
            Path(f"{original}.pub").write_bytes(saved[1])
            os.chmod(original, 0o600)
            t.host_key = t.pinned_host_key
            self._start_target(t)

    # -- the jump host -----------------------------------------------------------------------
    def config_text(self) -> str:
        """The jump host's kmsbastion.toml, from the inventory."""
        now = datetime.datetime.now(datetime.timezone.utc)
        lines = [
            "# generated by tests/system/world.py",
            "[kms]",
            f'endpoint = "{self.kms_endpoint}"',
            'credentials = "file"',
            f'credentials_file = "{CREDENTIALS_PATH}"',
            f"deadline_ms = {self.kms_deadline_ms}",
            "",
            "[bastion]",
            f'group = "{BASTION_GROUP}"',
            f"gid = {BASTION_GID}",
            "uid_min = 64001",
            "uid_max = 64999",
            'home = "/"',
            f'shell = "{BIN_DIR}/kmsbastion-connect"',
            f'broker = "{BIN_DIR}/kmsbastion-broker"',
            f'service_user = "{SERVICE_USER}"',
            f'ssh = "{SSH}"',
            f'runtime_dir = "{RUNTIME_DIR}"',
            "connect_timeout_s = 10",
            "",
            "[audit]",
            f'file = "{self.audit_log}"',
            "syslog = true",
            "",
        ]
        for t in self.targets.values():
            lines += [
                "[[host]]",
                f'name = "{t.name}"',
                f'address = "{t.address}"',
                f"port = {t.port}",
                f'host_keys = ["{t.pinned_host_key}"]',
                f'instance_id = "{t.instance_id}"',
                "  [[host.account]]",
                f'  name = "{t.account}"',
                f'  secret = "{t.secret_name}"',
                "",
            ]
        for e in self.engineers.values():
            lines += ["[[engineer]]", f'name = "{e.name}"', f"uid = {e.uid}", f'keys = ["{e.public_key}"]']
            if e.groups:
                lines.append("groups = [" + ", ".join(f'"{g}"' for g in e.groups) + "]")
            lines.append("")

        def stamp(dt: datetime.datetime) -> str:
            return dt.strftime("%Y-%m-%dT%H:%M:%SZ")

        grants = [
            ('engineers = ["alice"]', '["root@web-01", "deploy@web-02"]', '["127.0.0.0/8"]', None, None),
            ('engineers = ["carol"]', '["root@web-01"]', None,
             stamp(now - datetime.timedelta(days=30)), stamp(now - datetime.timedelta(days=1))),
            ('engineers = ["dave"]', '["root@web-01"]', '["10.0.0.0/8"]', None, None),
        ]
        for who, accounts, source, not_before, not_after in grants:
            lines += ["[[grant]]", who, f"accounts = {accounts}"]
            if source:
                lines.append(f"from = {source}")
            if not_before:
                lines.append(f'not_before = "{not_before}"')
            if not_after:
                lines.append(f'not_after = "{not_after}"')
            lines.append("")
        return "\n".join(lines)

    def write_config(self, text: Optional[str] = None) -> None:
        """(Re)writes /etc/kmsbastion/kmsbastion.toml (default: from the inventory). NSS, the
        AuthorizedKeysCommand and the PAM module read it at every login."""
        _write(CONFIG_PATH, text if text is not None else self.config_text(), 0o644)

    def _configure_jump(self) -> None:
        ETC_DIR.mkdir(mode=0o755, exist_ok=True)
        self.write_config()
        _write(CREDENTIALS_PATH,
               f'# KMS AccessKey of the bastion (test world)\naccess_key_id = "{self._ak_id}"\n'
               f'access_key_secret = "{self._ak_secret}"\n', 0o600, SERVICE_USER)
        if not self.audit_log.exists():
            _write(self.audit_log, "", 0o640, SERVICE_USER)
        os.chmod(RUNTIME_DIR, 0o755)
        self._wire_nsswitch()
        self._wire_pam()
        jump = self.root / "jump"
        drop_in_dir = jump / "sshd_config.d"
        drop_in_dir.mkdir(mode=0o755, exist_ok=True)
        text = DROP_IN.read_text()
        if SHIPPED_LIBEXEC not in text:
            raise WorldError(f"{DROP_IN} no longer names {SHIPPED_LIBEXEC}; update World._configure_jump")
        # The shipped drop-in, byte for byte except the install prefix.
        _write(drop_in_dir / "00-kmsbastion.conf", text.replace(SHIPPED_LIBEXEC, f"{BIN_DIR}/"), 0o644)
        # Modelled on Debian's sshd_config: drop-ins are included FIRST, and the main file
        # then turns on what the drop-in must override for engineers (X11, agent, TCP).
        _write(jump / "sshd_config", f"""# jump host: generated by tests/system/world.py
Include {drop_in_dir}/*.conf
ListenAddress {self.jump_addr}:22
ListenAddress {self.jump_foreign_addr}:22
HostKey {jump}/ssh_host_ed25519_key
PidFile none
LogLevel VERBOSE
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
AllowAgentForwarding yes
AllowTcpForwarding yes
PrintMotd no
PrintLastLog no
AcceptEnv LANG LC_*
Subsystem sftp {SFTP_SERVER}
""", 0o600)

    def _saved(self, path: Path) -> str:
        """The namespace's original content of an /etc file (saved on first use)."""
        keep = self.root / "orig" / path.name
        if not keep.exists():
            keep.parent.mkdir(mode=0o700, exist_ok=True)
            shutil.copyfile(path, keep)
        return keep.read_text()

    def _wire_nsswitch(self) -> None:
        out = []
        for line in self._saved(Path("/etc/nsswitch.conf")).splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("passwd", "group") and not line.lstrip().startswith("#"):
                sources = line.split(":", 1)[1].split()
                sources = [s for s in sources if s != "kmsbastion"]
                at = sources.index("files") + 1 if "files" in sources else 0
                sources.insert(at, "kmsbastion")
                line = f"{key}:         {' '.join(sources)}"
            out.append(line)
        _write(Path("/etc/nsswitch.conf"), "\n".join(out) + "\n")

    def _wire_pam(self) -> None:
        """/etc/pam.d/sshd with the shipped lines, placed as `kmsbastion enable` places them
        outside pam-auth-update: account lines before the first account line, session lines
        after the last session line; the module by absolute path."""
        ours = [l for l in PAM_SNIPPET.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
        ours = [l.replace("pam_kmsbastion.so", str(BIN_DIR / "pam_kmsbastion.so")) for l in ours]
        if not any(l.split()[0] == "account" for l in ours) or not any(l.split()[0] == "session" for l in ours):
            raise WorldError(f"{PAM_SNIPPET} has no account or no session line")

        def kind(line: str) -> Optional[str]:
            t = line.strip()
            if not t or t.startswith("#"):
                return None
            if t.startswith("@include"):
                return next((k for k in ("account", "session") if k in t), None)
            return t.split()[0].lstrip("-")

        lines = self._saved(Path("/etc/pam.d/sshd")).splitlines()
        first_account = next(i for i, l in enumerate(lines) if kind(l) == "account")
        last_session = max(i for i, l in enumerate(lines) if kind(l) == "session")
        out = []
        for i, line in enumerate(lines):
            if i == first_account:
                out += ["# BEGIN kmsbastion account (test world)"] + [l for l in ours if l.split()[0] == "account"] + ["# END kmsbastion account"]
            out.append(line)
            if i == last_session:
                out += ["# BEGIN kmsbastion session (test world)"] + [l for l in ours if l.split()[0] == "session"] + ["# END kmsbastion session"]
        _write(Path("/etc/pam.d/sshd"), "\n".join(out) + "\n")

    def _start_jump(self) -> None:
        config = self.root / "jump" / "sshd_config"
        check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise WorldError(f"jump sshd configuration rejected: {check.stderr}")
        log = self.log_dir / "sshd-jump.log"
        with open(log, "ab") as logf:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self.daemons["sshd-jump"] = Daemon("sshd-jump", proc, log)
        _wait_port(self.jump_addr, 22, 10, proc, "jump sshd", log)

    def sshd_effective(self, user: str, addr: str = "127.0.0.1") -> dict[str, str]:
        """``sshd -T`` of the jump host for a connection of ``user`` from ``addr``."""
        r = _run([SSHD, "-T", "-f", str(self.root / "jump" / "sshd_config"), "-C",
                  f"user={user},host=client,addr={addr},laddr={self.jump_addr},lport=22"])
        out: dict[str, str] = {}
        for line in r.stdout.splitlines():
            k, _, v = line.partition(" ")
            out.setdefault(k, v)
        return out

    # ---------------------------------------------------------------------------------------
    # clients
    # ---------------------------------------------------------------------------------------
    def login(self, engineer: str, target: Optional[str] = None, account: Optional[str] = None) -> str:
        """The SSH user name ``engineer@account@host`` (``engineer`` alone without target)."""
        if target is None:
            return engineer
        return f"{engineer}@{account or self.targets[target].account}@{target}"

    def key_for(self, login: str) -> Path:
        """The client key that belongs to a login: the engineer's, or the local admin's."""
        name = login.split("@", 1)[0]
        if name in self.engineers:
            return self.engineers[name].key
        return self.admin_key

    def ssh_argv(
        self,
        login: str,
        *remote_cmd: str,
        key: Optional[os.PathLike] = None,
        tty: bool = False,
        extra_opts: Iterable[str] = (),
        bind_address: Optional[str] = None,
        host: Optional[str] = None,
    ) -> list[str]:
        """The client command line: no user configuration, only ``key``, the jump host's key
        pinned (StrictHostKeyChecking=yes), no agent, batch mode."""
        argv = [
            SSH, "-F", "none", "-i", str(key or self.key_for(login)),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            "-tt" if tty else "-T",
        ]
        if bind_address:
            argv += ["-b", bind_address]
        argv += list(extra_opts)
        argv += ["-l", login, "-p", "22", host or self.jump_addr]
        if remote_cmd:
            argv += ["--", *remote_cmd]
        return argv

    def ssh(
        self,
        login: str,
        *remote_cmd: str,
        key: Optional[os.PathLike] = None,
        tty: bool = False,
        input: Optional[str | bytes] = None,
        extra_opts: Iterable[str] = (),
        bind_address: Optional[str] = None,
        host: Optional[str] = None,
        timeout: float = 60,
        text: bool = True,
        env: Optional[dict] = None,
    ) -> subprocess.CompletedProcess:
        """Runs ``ssh login@jump remote_cmd…`` and returns the completed process (stdout and
        stderr captured). ``input`` is fed to stdin (else stdin is /dev/null)."""
        argv = self.ssh_argv(login, *remote_cmd, key=key, tty=tty, extra_opts=extra_opts,
                             bind_address=bind_address, host=host)
        if isinstance(input, str) and not text:
            input = input.encode()
        return subprocess.run(argv, input=input, capture_output=True, text=text, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              env=env if env is not None else self.client_env())

    def client_env(self, **extra: str) -> dict:
        """A clean client environment (HOME inside the world)."""
        home = self.root / "client"
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "TERM": "xterm"}
        env.update(extra)
        return env

    def spawn_ssh(self, login: str, *remote_cmd: str, tty: bool = True, dimensions=(24, 80),
                  timeout: float = 30, **kw):
        """An interactive ``ssh`` under a pseudo-terminal (pexpect.spawn, text mode)."""
        import pexpect  # in build/venv

        argv = self.ssh_argv(login, *remote_cmd, tty=tty, **kw)
        return pexpect.spawn(argv[0], argv[1:], env=self.client_env(), encoding="utf-8",
                             codec_errors="replace", dimensions=dimensions, timeout=timeout)

    def direct_ssh(self, target: str, *remote_cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Logs in to the target DIRECTLY with its current credential (what the bastion does
        on the engineer's behalf), for comparisons and timings. The credential is written to a
        0600 file only for the duration of the call."""
        t = self.targets[target]
        data = json.loads(self.kms.get_secret_value(t.secret_name)["SecretData"])
        scratch = Path(f"/run/kmsb-direct-{os.getpid()}")
        scratch.mkdir(mode=0o700, exist_ok=True)
        try:
            argv = [SSH, "-F", "none", "-o", "StrictHostKeyChecking=yes",
                    "-o", f"UserKnownHostsFile={self.root / 'client' / 'known_hosts_targets'}",
                    "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentityAgent=none", "-o", "LogLevel=ERROR",
                    "-o", "IdentitiesOnly=yes", "-T"]
            env = self.client_env()
            if t.sub_type == "SSHKey":
                _write(scratch / "key", data["PrivateKey"], 0o600)
                argv += ["-i", str(scratch / "key"), "-o", "BatchMode=yes"]
            else:
                _write(scratch / "pw", data["Password"], 0o600)
                _write(scratch / "askpass", f"#!/bin/sh\ncat {scratch / 'pw'}\n", 0o700)
                argv += ["-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1"]
                env.update(SSH_ASKPASS=str(scratch / "askpass"), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
            argv += ["-l", t.account, t.address, "--", *remote_cmd]
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # ---------------------------------------------------------------------------------------
    # observation
    # ---------------------------------------------------------------------------------------
    def audit_events(self) -> list[dict]:
        """Every audit event so far (JSON lines of the audit file; a torn last line is
        skipped)."""
        out = []
        try:
            text = self.audit_log.read_text()
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def audit_mark(self) -> int:
        """A position in the audit log; pass it to :meth:`audit_since`."""
        return len(self.audit_events())

    def audit_since(self, mark: int) -> list[dict]:
        """The audit events after ``mark``."""
        return self.audit_events()[mark:]

    def pids_of(self, exe: os.PathLike) -> list[int]:
        """Pids whose executable is ``exe`` (e.g. ``world.bin("kmsbastion-broker")``)."""
        want = os.path.realpath(exe)
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "exe") == want:
                    out.append(int(entry.name))
            except OSError:
                continue
        return out

    def broker_pids(self) -> list[int]:
        """Pids of running brokers."""
        return self.pids_of(self.bin("kmsbastion-broker"))

    def sessions(self) -> list[dict]:
        """Live bastion sessions: one dict per running ``kmsbastion-connect`` with its
        ``pid``, ``uid`` and ``socket`` (its ``KMSBASTION_SOCKET``)."""
        out = []
        for pid in self.pids_of(self.bin("kmsbastion-connect")):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                uid = os.stat(f"/proc/{pid}").st_uid
            except OSError:
                continue
            sock = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"KMSBASTION_SOCKET=")), None)
            out.append({"pid": pid, "uid": uid, "socket": sock})
        return out

    def knock(self, socket_path: str, command: str = "id -un", uid: int = 0, gid: int = BASTION_GID,
              kind: str = "exec", term: str = "") -> dict:
        """Sends one broker request to ``socket_path`` as ``uid``/``gid`` (via setpriv) with
        a tiny connector speaking the connect ⇄ broker protocol; returns its JSON report:
        ``connect_error`` (e.g. "Permission denied"), ``reply`` (``{"exit": n}``,
        ``{"failed": code, "message": …}`` or ``{"closed": True}``), ``stdout``, ``stderr``."""
        script = _write(self.root / "connector.py", CONNECTOR, 0o755)
        kinds = {"shell": 0, "exec": 1, "subsystem": 2}
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
                "/usr/bin/python3", str(script), socket_path, str(kinds[kind]), command, term]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
        if r.returncode != 0 or not r.stdout.strip():
            raise WorldError(f"connector failed ({r.returncode}): {r.stdout}{r.stderr}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    @staticmethod
    def wait_for(predicate: Callable[[], object], timeout: float = 10, interval: float = 0.1, what: str = "condition"):
        """Polls ``predicate`` until it returns a truthy value (returned) or raises WorldError."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise WorldError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    def scan_for(self, needles: Iterable[bytes], roots: Iterable[os.PathLike] = (),
                 exclude: Iterable[os.PathLike] = (), procs: bool = True) -> list[str]:
        """Where any of ``needles`` occurs: regular files under ``roots`` (default: /run,
        /tmp, the log dir, /home, /etc (the namespace's private copy), /var/log and
        /root/.ssh; the KMS emulator's state, i.e. "KMS itself", excluded) and every
        ``/proc/*/environ`` and ``/proc/*/cmdline``. Returns ``path: needle-index`` strings;
        empty means no hit. (/root is the host's and holds toolchains; nothing in the
        namespace writes there except possibly ~/.ssh.)"""
        needles = [n for n in needles if n]
        roots = list(roots) or ["/run", "/tmp", self.log_dir, "/home", "/etc", "/var/log", "/root/.ssh"]
        skip = {os.path.realpath(p) for p in [self.root / "kms-state", *exclude]}
        hits = []

        def check(path: str, data: bytes) -> None:
            for i, n in enumerate(needles):
                if n in data:
                    hits.append(f"{path}: needle {i}")

        seen = set()
        for root in roots:
            for dirpath, dirnames, filenames in os.walk(root):
                real = os.path.realpath(dirpath)
                if real in skip or real in seen:
                    dirnames[:] = []
                    continue
                seen.add(real)
                dirnames[:] = [d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in skip]
                for f in filenames:
                    p = os.path.join(dirpath, f)
                    try:
                        st = os.lstat(p)
                        if not (st.st_mode & 0o170000 == 0o100000) or st.st_size > 64 << 20:
                            continue
                        with open(p, "rb") as fh:
                            check(p, fh.read())
                    except OSError:
                        continue
        if procs:
            me = os.getpid()
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                for f in ("environ", "cmdline"):
                    try:
                        check(str(entry / f), (entry / f).read_bytes())
                    except OSError:
                        continue
        return hits


# A tiny connect ⇄ broker client (src/session.rs wire format) run as any uid via setpriv: the
# hostile-engineer tests use it to knock on broker sockets that are not theirs. It passes pipes
# as stdin/stdout/stderr, prints one JSON line: the connect error, the broker's reply, output.
CONNECTOR = r'''
import array, json, os, socket, struct, sys
path, kind, command, term = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), sys.argv[4]
out = {"uid": os.getuid(), "connect_error": None, "reply": None, "stdout": "", "stderr": ""}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(path)
except OSError as e:
    out["connect_error"] = e.strerror
    print(json.dumps(out)); sys.exit(0)
in_r, in_w = os.pipe(); out_r, out_w = os.pipe(); err_r, err_w = os.pipe()
body = bytes([1, kind, 0])
body += (bytes([1]) + struct.pack(">H", len(term)) + term.encode()) if term else bytes([0])
body += struct.pack(">I", len(command)) + command
frame = struct.pack(">I", len(body)) + body
try:
    s.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [in_r, out_w, err_w]))])
    os.close(in_r); os.close(out_w); os.close(err_w); os.close(in_w)
    buf = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) >= 4 and len(buf) >= 4 + struct.unpack(">I", buf[:4])[0]:
            break
    if len(buf) >= 5:
        tag = buf[4]
        if tag == 4:
            out["reply"] = {"exit": buf[5]}
        elif tag == 5:
            n = struct.unpack(">H", buf[6:8])[0]
            out["reply"] = {"failed": buf[5], "message": buf[8:8 + n].decode(errors="replace")}
        else:
            out["reply"] = {"tag": tag}
    else:
        out["reply"] = {"closed": True}
except OSError as e:
    out["reply"] = {"error": e.strerror}
for key, fd in (("stdout", out_r), ("stderr", err_r)):
    os.set_blocking(fd, False)
    try:
        out[key] = os.read(fd, 65536).decode(errors="replace")
    except OSError:
        pass
print(json.dumps(out))
'''


def median_seconds(fn: Callable[[], object], runs: int = 5) -> float:
    """Median wall time of ``fn()`` over ``runs`` runs."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


if __name__ == "__main__":
    # `run-in-ns build/venv/bin/python tests/system/world.py [CMD…]`: start a world, print how
    # to reach it, run CMD (default: an interactive shell), stop.
    with World() as w:
        print(f"KMS emulator: {w.kms_endpoint}")
        for e in w.engineers.values():
            print(f"  {e.name}: ssh -F none -i {e.key} -o UserKnownHostsFile={w.known_hosts} {e.name}@root@web-01@{w.jump_addr}")
        sys.stdout.flush()
        rc = subprocess.call(sys.argv[1:] or ["/bin/bash", "-i"])
    sys.exit(rc)
