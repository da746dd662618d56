"""Login benchmarks (issue 7, parts 1 and 3) on top of the system tests' ``World``.

Three ways to run ``true`` on a target, timed from spawning ``ssh`` to its exit:

* ``bastion``: ``ssh alice@root@web-01@jump true`` (the composite login: NSS, AKC, PAM, broker,
  KMS GetSecretValue, onward ``ssh`` with the secret);
* ``proxyjump``: the physical reference, stock OpenSSH doing the same two hops: ``ssh -J
  admin@jump root@web-01 true``, where ``admin`` is an ordinary local user of the jump host
  (its own ed25519 key in ``~/.ssh/authorized_keys``) and the target accepts a static key of
  the same kind as the secret's (RSA-2048, PEM), appended to its authorized_keys; for the
  password target (``web-02``, ``deploy``) the second hop authenticates with the password
  through ``SSH_ASKPASS`` (``SSH_ASKPASS_REQUIRE=force``);
* ``direct``: the client straight to the target with the same static credential.

All three read one client configuration file (``-F``; ProxyJump passes it on to the jump
``ssh -W``), pin every host key and use no agent. Runs are interleaved (the order rotates every
round) after a warm-up, and spawned with ``posix_spawn`` so no variant pays a different Python
cost.

The concurrency test starts N bastion logins at once (threads released by one barrier) while a
sampler reads ``VmHWM``/``VmRSS`` of every ``kmsbastion-broker`` process from ``/proc`` every
few milliseconds, and counts the emulator's ``GetSecretValue`` calls (stats reset before). The
jump sshd runs with the shipped drop-in, as ``kmsbastion enable`` installs it (its
``MaxStartups 100:30:200`` included), or, for comparison, with the drop-in as
``enable --keep-max-startups`` installs it (OpenSSH's built-in ``10:30:100``); the targets
always keep stock sshd settings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from stats import Samples

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "system"))

from world import SSH, World, WorldError, _write, ssh_keygen  # noqa: E402


#: How the jump sshd's MaxStartups is set up for a concurrency run.
JUMP_DROP_IN = "drop-in"  # the shipped drop-in as `kmsbastion enable` installs it
JUMP_STOCK = "stock"  # the drop-in without its MaxStartups line (`--keep-max-startups`)


class BenchWorld(World):
    """The system tests' World, plus what the reference measurements need (static
    credentials, a client configuration) and a way to run the jump sshd without the drop-in's
    ``MaxStartups`` for comparison."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.jump_setup = JUMP_DROP_IN

    def _drop_in_path(self) -> Path:
        return self.root / "jump" / "sshd_config.d" / "00-kmsbastion.conf"

    def set_jump_max_startups(self, setup: str) -> str:
        """Installs the drop-in on the jump host with (``JUMP_DROP_IN``) or without
        (``JUMP_STOCK``: the line commented out, as ``kmsbastion enable --keep-max-startups``
        does) its MaxStartups line, reloads the jump sshd (SIGHUP: it re-executes itself with
        the same pid) and returns the effective value as ``sshd -T`` shows it. The targets
        are not touched."""
        path = self._drop_in_path()
        lines = path.read_text().splitlines(keepends=True)
        out = []
        for line in lines:
            if setup == JUMP_STOCK and re.match(r"MaxStartups \d", line):
                out.append("# " + line)
            elif setup == JUMP_DROP_IN and re.match(r"# MaxStartups \d", line):
                out.append(line[2:])
            else:
                out.append(line)
        path.write_text("".join(out))
        self.jump_setup = setup
        self.daemons["sshd-jump"].process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        self.wait_for(lambda: _banner(self.jump_addr), timeout=10, what="sshd-jump after reload")
        return self.jump_max_startups()

    def jump_max_startups(self) -> str:
        """The jump sshd's effective MaxStartups (``sshd -T``)."""
        return self.sshd_effective("admin").get("maxstartups", "?")

    def target_max_startups(self, target: str) -> str:
        """A target sshd's effective MaxStartups (``sshd -T -f`` of its configuration)."""
        import subprocess

        from world import SSHD

        r = subprocess.run([SSHD, "-T", "-f", str(self.targets[target].dir / "sshd_config"), "-C",
                            f"user=root,host=client,addr={self.jump_addr}"],
                           capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if line.startswith("maxstartups "):
                return line.split()[1]
        return "?"


def _banner(addr: str) -> bool:
    import socket

    try:
        with socket.create_connection((addr, 22), timeout=1) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@dataclass
class Variant:
    """One way to log in: a Host alias of the client configuration and its environment."""

    name: str
    target: str
    host: str
    env: dict = field(default_factory=dict)


class Reference:
    """Static credentials and the client configuration for the three variants."""

    def __init__(self, w: BenchWorld):
        self.w = w
        self.dir = w.root / "bench"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        web01, web02 = w.targets["web-01"], w.targets["web-02"]
        # The static key of the reference: the same kind as ECS secrets (RSA-2048, PEM).
        self.static_key = self.dir / "static_rsa"
        if not self.static_key.exists():
            ssh_keygen(self.static_key, "rsa", "bench-static", bits=2048, pem=True)
        with open(web01.authorized_keys, "a") as f:
            f.write(Path(f"{self.static_key}.pub").read_text().strip() + "\n")
        # The password target's password (ACSCurrent) for the reference's askpass: a 0600
        # file in the bench's private directory, read by a two-line askpass script.
        data = json.loads(w.kms.get_secret_value(web02.secret_name)["SecretData"])
        pw = _write(self.dir / "password", data["Password"], 0o600)
        self.askpass = _write(self.dir / "askpass", f"#!/bin/sh\nexec cat {pw}\n", 0o700)
        known = f"{w.known_hosts} {w.root / 'client' / 'known_hosts_targets'}"
        alice = w.engineers["alice"].key
        common = f"""    StrictHostKeyChecking yes
    UserKnownHostsFile {known}
    GlobalKnownHostsFile /dev/null
    UpdateHostKeys no
    IdentityAgent none
    IdentitiesOnly yes
    ConnectTimeout 20
    LogLevel ERROR
    RequestTTY no
"""
        self.config = _write(self.dir / "ssh_config", f"""# bench/logins.py: the client side of the three variants
Host jump
    HostName {w.jump_addr}
    User admin
    IdentityFile {w.admin_key}
    BatchMode yes
{common}
Host bastion-web-01
    HostName {w.jump_addr}
    User {w.login('alice', 'web-01')}
    IdentityFile {alice}
    BatchMode yes
{common}
Host bastion-web-02
    HostName {w.jump_addr}
    User {w.login('alice', 'web-02')}
    IdentityFile {alice}
    BatchMode yes
{common}
Host proxyjump-web-01 direct-web-01
    HostName {web01.address}
    User {web01.account}
    IdentityFile {self.static_key}
    BatchMode yes
{common}
Host proxyjump-web-02 direct-web-02
    HostName {web02.address}
    User {web02.account}
    PubkeyAuthentication no
    PreferredAuthentications password
    NumberOfPasswordPrompts 1
{common}
Host proxyjump-*
    ProxyJump jump
""", 0o600)
        askpass_env = {"SSH_ASKPASS": str(self.askpass), "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
        self.variants = {
            ("web-01", "bastion"): Variant("bastion", "web-01", "bastion-web-01"),
            ("web-01", "proxyjump"): Variant("proxyjump", "web-01", "proxyjump-web-01"),
            ("web-01", "direct"): Variant("direct", "web-01", "direct-web-01"),
            ("web-02", "bastion"): Variant("bastion", "web-02", "bastion-web-02"),
            ("web-02", "proxyjump"): Variant("proxyjump", "web-02", "proxyjump-web-02", askpass_env),
            ("web-02", "direct"): Variant("direct", "web-02", "direct-web-02", askpass_env),
        }
        self.env = w.client_env()

    def argv(self, v: Variant, *extra: str) -> list[str]:
        return [SSH, "-F", str(self.config), *extra, v.host, "true"]

    def run(self, v: Variant, stderr_path: Path, *extra: str) -> tuple[float, int]:
        """One timed login; returns (seconds, exit status). stderr goes to ``stderr_path``."""
        env = dict(self.env, **v.env)
        devnull = os.open(os.devnull, os.O_RDWR)
        err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                       (os.POSIX_SPAWN_DUP2, err, 2)]
            argv = self.argv(v, *extra)
            t0 = time.perf_counter()
            pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
            _, status = os.waitpid(pid, 0)
            return time.perf_counter() - t0, os.waitstatus_to_exitcode(status)
        finally:
            os.close(devnull)
            os.close(err)


@dataclass
class LoginResult:
    """Per target: samples per variant, failures, and the KMS calls of the bastion runs."""

    target: str
    samples: dict
    failures: dict
    getsecretvalue: int = 0
    bastion_ok: int = 0
    onward: int = 0
    errors: list = field(default_factory=list)


def login_overhead(ref: Reference, target: str, runs: int, warmup: int = 3, log=print) -> LoginResult:
    """Interleaved timed logins of the three variants to ``target``."""
    names = ("bastion", "proxyjump", "direct")
    samples = {n: Samples(f"{n} {target}") for n in names}
    failures = {n: 0 for n in names}
    errors: list[str] = []
    scratch = ref.dir / f"stderr-{target}"
    res = LoginResult(target, samples, failures, errors=errors)
    for i in range(warmup):
        for n in names:
            t, rc = ref.run(ref.variants[(target, n)], scratch)
            if rc != 0:
                raise WorldError(f"warm-up login {n} → {target} failed (exit {rc}): {scratch.read_text()[-800:]}")
    ref.w.kms.reset_stats()
    mark = ref.w.audit_mark()
    for i in range(runs):
        order = names[i % 3:] + names[:i % 3]
        for n in order:
            t, rc = ref.run(ref.variants[(target, n)], scratch)
            if rc == 0:
                samples[n].values.append(t)
                if n == "bastion":
                    res.bastion_ok += 1
            else:
                failures[n] += 1
                if len(errors) < 5:
                    errors.append(f"{n} → {target} run {i}: exit {rc}: {scratch.read_text()[-400:]}")
    res.getsecretvalue = ref.w.kms_stats().get("GetSecretValue", 0)
    res.onward = sum(1 for e in ref.w.audit_since(mark) if e.get("event") == "connect-start")
    log(f"logins {target}: " + ", ".join(
        f"{n} median {samples[n].median * 1e3:.1f} ms p95 {samples[n].p(0.95) * 1e3:.1f} ms"
        + (f" ({failures[n]} failed)" if failures[n] else "") for n in names))
    return res


# --------------------------------------------------------------------------------------------
# concurrency
# --------------------------------------------------------------------------------------------


class BrokerSampler(threading.Thread):
    """Samples VmHWM/VmRSS (KiB) of every process whose executable is the broker."""

    def __init__(self, broker_exe: Path, interval: float = 0.003):
        super().__init__(daemon=True)
        self.exe = os.path.realpath(broker_exe)
        self.interval = interval
        self.peak: dict[int, dict] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            time.sleep(self.interval)
        self.sample()

    def sample(self) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if os.readlink(f"/proc/{pid}/exe") != self.exe:
                    continue
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            hwm = _kib(status, "VmHWM")
            rss = _kib(status, "VmRSS")
            if hwm is None:
                continue
            p = self.peak.setdefault(pid, {"hwm": 0, "rss": 0, "samples": 0})
            p["hwm"] = max(p["hwm"], hwm)
            p["rss"] = max(p["rss"], rss or 0)
            p["samples"] += 1

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def _kib(status: str, key: str) -> Optional[int]:
    m = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
    return int(m.group(1)) if m else None


@dataclass
class ConcurrencyResult:
    n: int
    samples: Samples
    failures: int
    errors: list
    getsecretvalue: int
    brokers: dict
    wall: float
    #: ``JUMP_DROP_IN`` or ``JUMP_STOCK``.
    jump_setup: str
    #: Effective MaxStartups of the jump and of the target sshd (``sshd -T``).
    jump_max_startups: str
    target_max_startups: str
    #: Onward connections the brokers started (``connect-start`` audit events).
    onward: int
    variant: str = "bastion"
    #: Failures by the client's last stderr line (the message an engineer sees), most first.
    causes: list = field(default_factory=list)
    #: Failures by the sshd that refused them: {"jump": n, "target": n, "other": n}.
    hops: dict = field(default_factory=dict)

    @property
    def broker_peak_mib(self) -> float:
        return max((p["hwm"] for p in self.brokers.values()), default=0) / 1024

    @property
    def broker_median_mib(self) -> float:
        import statistics

        v = [p["hwm"] for p in self.brokers.values()]
        return statistics.median(v) / 1024 if v else float("nan")

    @property
    def gsv_per_connection(self) -> float:
        return self.getsecretvalue / self.onward if self.onward else float("nan")


def failed_hop(variant: str, rc: Optional[int], stderr: str) -> str:
    """Which sshd refused a failed login: ``jump``, ``target`` or ``other``.

    bastion: the client talks only to the jump sshd, so a ``kex_exchange_identification``
    error (exit 255) is the jump's; the broker reports a target that dropped the onward
    connection as ``connection reset by the target`` (exit 75). ProxyJump: a jump that drops
    the connection makes both the inner ``ssh -W`` and the client report a
    ``kex_exchange_identification`` error; a target that drops it only the client (the jump
    hop had authenticated and opened the channel)."""
    kex = stderr.count("kex_exchange_identification")
    if variant == "bastion":
        if rc == 255 and kex:
            return "jump"
        if "by the target" in stderr:
            return "target"
        return "other"
    if kex >= 2:
        return "jump"
    if kex == 1:
        return "target"
    return "other"


def concurrency(ref: Reference, n: int, target: str = "web-01", variant: str = "bastion",
                log=print) -> ConcurrencyResult:
    """Starts ``n`` logins of ``variant`` at once; see the module doc."""
    v = ref.variants[(target, variant)]
    barrier = threading.Barrier(n + 1)
    results: list = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        results[i] = ref.run(v, ref.dir / f"stderr-conc-{i}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    ref.w.kms.reset_stats()
    mark = ref.w.audit_mark()
    sampler = BrokerSampler(ref.w.bin("kmsbastion-broker"))
    sampler.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(timeout=300)
    wall = time.perf_counter() - t0
    # Brokers outlive the client by a moment (session close); let the sampler see them go.
    deadline = time.monotonic() + 10
    while ref.w.broker_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    sampler.stop()
    gsv = ref.w.kms_stats().get("GetSecretValue", 0)
    onward = sum(1 for e in ref.w.audit_since(mark) if e.get("event") == "connect-start")
    s = Samples(f"{n} concurrent {variant} logins → {target}")
    failures = 0
    errors = []
    causes: dict[str, int] = {}
    hops = {"jump": 0, "target": 0, "other": 0}
    for i, r in enumerate(results):
        if r is not None and r[1] == 0:
            s.values.append(r[0])
        else:
            failures += 1
            text = (ref.dir / f"stderr-conc-{i}").read_text(errors="replace").strip()
            last = text.splitlines()[-1] if text else "(no message)"
            cause = f"exit {r[1] if r else 'none'}: {last}"
            causes[cause] = causes.get(cause, 0) + 1
            hops[failed_hop(variant, r[1] if r else None, text)] += 1
            if len(errors) < 8:
                errors.append(f"login {i}: exit {r[1] if r else 'none'}: {text[-300:]}")
    jump_ms, target_ms = ref.w.jump_max_startups(), ref.w.target_max_startups(target)
    res = ConcurrencyResult(n, s, failures, errors, gsv, sampler.peak, wall, ref.w.jump_setup, jump_ms,
                            target_ms, onward, variant,
                            sorted(causes.items(), key=lambda kv: (-kv[1], kv[0])), hops)
    log(f"concurrency ({n} {variant}, jump MaxStartups {jump_ms} ({ref.w.jump_setup}), target {target_ms}): "
        f"{failures} failed (jump {hops['jump']}, target {hops['target']}, other {hops['other']}), "
        f"p50 {s.median * 1e3:.0f} ms p95 {s.p(0.95) * 1e3:.0f} ms, {len(sampler.peak)} brokers seen, "
        f"peak VmHWM {res.broker_peak_mib:.2f} MiB, GetSecretValue {gsv} for {onward} onward connections")
    return res
