"""Where the time goes, for the targets a run misses: ``perf`` profiles of the helpers and a
timestamped timeline of one login (client ``ssh -v`` lines plus the jump host's audit events).
"""

from __future__ import annotations

import datetime
import re
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Optional


def have_perf() -> bool:
    """Whether ``perf record`` works here (the binary exists and may sample)."""
    perf = shutil.which("perf")
    if not perf:
        return False
    r = subprocess.run([perf, "record", "-q", "-o", "/dev/null", "--", "true"], capture_output=True)
    return r.returncode == 0


def perf_top(argv: list[str], workdir: Path, name: str, limit: int = 15, env: Optional[dict] = None,
             repeat: int = 1) -> str:
    """``perf record -g`` of a command run ``repeat`` times in a row (more samples for short
    calls); returns the self time per DSO and the top self-time symbols (perf report
    ``--no-children``) as text, or why there is none."""
    if not have_perf():
        return "(perf is not available here)"
    data = workdir / f"perf-{name}.data"
    if repeat > 1:
        loop = f'i=0; while [ $i -lt {repeat} ]; do "$@" >/dev/null || exit 1; i=$((i+1)); done'
        argv = ["/bin/sh", "-c", loop, "sh", *argv]
    r = subprocess.run(["perf", "record", "-q", "-F", "4000", "-g", "-o", str(data), "--", *argv],
                       capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        return f"(perf record failed: {r.stderr.strip()[-300:]})"

    def report(sort: str, n: int) -> list[str]:
        rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio", "-g", "none",
                              "--percent-limit", "0.5", "--sort", sort],
                             capture_output=True, text=True, timeout=300)
        return [l.rstrip() for l in rep.stdout.splitlines() if l.strip() and not l.startswith("#")][:n]

    head = [f"{repeat} run(s); self time by DSO:"] if repeat > 1 else ["self time by DSO:"]
    out = head + report("dso", 6) + ["", "top symbols:"] + report("dso,sym", limit)
    return "\n".join(out)


def nss_cold_argv(python: str, nss_lib: Path, login: str, config: Path, lookups: int = 10) -> list[str]:
    """A process that makes ``lookups`` cold getpwnam_r calls through the module (the
    configuration's mtime moves before each, so each one re-loads it)."""
    code = (
        "import ctypes,os,sys\n"
        f"lib=ctypes.CDLL({str(nss_lib)!r}); p={str(config)!r}\n"
        "buf=ctypes.create_string_buffer(4096); pw=ctypes.create_string_buffer(64); e=ctypes.c_int()\n"
        f"for i in range({lookups}):\n"
        "    st=os.stat(p); os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns+1000000000))\n"
        f"    s=lib._nss_kmsbastion_getpwnam_r({login.encode()!r},pw,buf,4096,ctypes.byref(e))\n"
        "    if s!=1: sys.exit(1)\n"
    )
    return [python, "-c", code]


def login_timeline(ref, variant, audit_since: Optional[int] = None) -> list[tuple[float, str]]:
    """One login with ``ssh -v``: every client debug line with its time (ms from spawn),
    merged with the audit events the jump host wrote during it."""
    w = ref.w
    mark = w.audit_mark()
    env = dict(ref.env, **variant.env)
    argv = ref.argv(variant, "-v", "-o", "LogLevel=DEBUG1")
    wall0 = time.time()
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env, text=True, bufsize=1)
    out: list[tuple[float, str]] = [(0.0, "client: spawn ssh")]
    assert p.stderr is not None
    for line in p.stderr:
        out.append(((time.perf_counter() - t0) * 1e3, "client: " + line.rstrip()))
    p.wait()
    out.append(((time.perf_counter() - t0) * 1e3, f"client: ssh exited {p.returncode}"))
    for ev in w.audit_since(mark):
        try:
            ts = datetime.datetime.strptime(ev["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                tzinfo=datetime.timezone.utc).timestamp()
        except (KeyError, ValueError):
            continue
        extra = {k: ev[k] for k in ("result", "duration_ms", "version_id", "exit_status") if k in ev}
        out.append(((ts - wall0) * 1e3, f"jump audit: {ev.get('event')} {extra if extra else ''}".rstrip()))
    out.sort(key=lambda x: x[0])
    return out


KEEP = ("spawn", "Connecting to", "Connection established", "Remote protocol", "kex: algorithm",
        "SSH2_MSG_KEX", "SSH2_MSG_NEWKEYS received", "Authentications that can continue",
        "Offering public key", "Server accepts key", "Authenticated to", "Next authentication method",
        "channel 0: new", "Sending command", "exit-status", "Transferred", "exited", "jump audit",
        "Setting implicit ProxyCommand", "Executing proxy command", "Authenticating to")


def compact(timeline: list[tuple[float, str]]) -> str:
    """The timeline lines worth reading, as ``  123.4 ms  text``."""
    return "\n".join(f"{t:8.1f} ms  {s}" for t, s in timeline if any(k in s for k in KEEP))


_EVENT = re.compile(r"^(\d+)\s+(\d+\.\d+) (?:<\.\.\. )?(\w+)\((.*)$")


def strace_login(ref, variant, workdir: Path, sshd_pid: int) -> str:
    """One login with ``strace -f`` attached to the jump host's sshd (only process
    lifecycle, connect and sleep/wait calls, to keep the tracing cost low): which process
    starts, connects and exits when, in ms since the connection was accepted, plus how often
    each process slept or polled ``wait4(WNOHANG)``."""
    if not shutil.which("strace"):
        return "(strace is not available here)"
    out = workdir / f"strace-{variant.name}-{variant.target}.txt"
    st = subprocess.Popen(["strace", "-f", "-ttt", "-q", "-s", "60", "-o", str(out), "-e",
                           "trace=execve,connect,exit_group,wait4,clock_nanosleep,accept4,openat",
                           "-p", str(sshd_pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    t, rc = ref.run(variant, workdir / "stderr-strace")
    time.sleep(0.5)
    st.terminate()
    st.wait(timeout=10)
    lines = out.read_text(errors="replace").splitlines()
    t0: Optional[float] = None
    rows: list[str] = []
    sleeps: dict[str, list] = {}
    names: dict[str, str] = {}
    for line in lines:
        m = _EVENT.match(line)
        if not m:
            continue
        pid, ts, call, args = m.group(1), float(m.group(2)), m.group(3), m.group(4)
        if t0 is None:
            if call != "execve":
                continue
            t0 = ts  # sshd re-executing itself for the new connection
        rel = (ts - t0) * 1e3
        if call == "execve" and "ENOENT" not in args and "resumed" not in line:
            prog = re.search(r'\["([^"]+)"(?:, "([^"]*)")?', args)
            if prog:
                names[pid] = os.path.basename(prog.group(1))
                rows.append(f"{rel:8.1f} ms  [{pid}] exec {names[pid]} {prog.group(2) or ''}".rstrip())
        elif call == "connect" and "nscd" not in args and "AF_UNSPEC" not in args and "::" not in args:
            addr = re.search(r'sun_path="([^"]+)"|sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)', args)
            if addr:
                where = addr.group(1) or f"{addr.group(3)}:{addr.group(2)}"
                rows.append(f"{rel:8.1f} ms  [{pid}] {names.get(pid, '?')} connect {where}")
        elif call == "openat" and "kmsbastion.toml" in args:
            rows.append(f"{rel:8.1f} ms  [{pid}] {names.get(pid, '?')} opens kmsbastion.toml")
        elif call == "exit_group":
            rows.append(f"{rel:8.1f} ms  [{pid}] {names.get(pid, '?')} exit {args.split(')')[0]}")
        elif call in ("clock_nanosleep",) or (call == "wait4" and "WNOHANG" in args and "= 0" in args):
            sleeps.setdefault(f"[{pid}] {names.get(pid, '?')} {call}", []).append(rel)
    summary = [f"{k}: {len(v)} calls between {v[0]:.0f} and {v[-1]:.0f} ms" for k, v in sleeps.items() if len(v) >= 3]
    head = f"login exit {rc}, {t * 1e3:.0f} ms under strace (tracing slows every process; compare gaps, not totals)"
    head += "; times in ms since sshd re-executed itself for the connection"
    return "\n".join([head, *rows, "", "repeated sleeps / non-blocking waits:", *(summary or ["(none)"])])


def onward_breakdown(w, ref, runs: int = 10) -> str:
    """Splits the bastion's onward phase of key logins to web-01 into: request → onward ssh
    started, the onward ssh itself, ssh exit → reply, by pointing ``[bastion] ssh`` at a
    two-line wrapper that stamps its start and end (``date +%s%N``) around ``/usr/bin/ssh``,
    next to the ``connect-start``/``connect-end`` audit events. Then it runs the same ssh
    command line (captured by the wrapper; it holds no secret) directly with the static
    reference key in place of the broker's agent, to show what that ssh costs without the
    broker. Restores the World's configuration afterwards."""
    stamps = Path("/run/kmsb-bench-stamps")
    stamps.mkdir(mode=0o1777, exist_ok=True)
    os.chmod(stamps, 0o1777)
    log = stamps / "ssh.log"
    log.write_text("")
    os.chmod(log, 0o666)
    wrapper = w.bin("ssh-timed")
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "start $$ $(date +%s%N)" >> {log}\n'
        f'printf "argv %s\\n" "$*" >> {log}\n'
        "/usr/bin/ssh \"$@\"\nrc=$?\n"
        f'echo "end $$ $(date +%s%N)" >> {log}\n'
        "exit $rc\n")
    os.chmod(wrapper, 0o755)
    base = w.config_text()
    w.write_config(base.replace('ssh = "/usr/bin/ssh"', f'ssh = "{wrapper}"'))
    v = ref.variants[("web-01", "bastion")]
    rows = []
    try:
        for i in range(runs):
            mark = w.audit_mark()
            log.write_text("")
            wall0 = time.time()
            t, rc = ref.run(v, ref.dir / "stderr-onward")
            ev = {e.get("event"): e for e in w.audit_since(mark)}
            text = log.read_text().split("\n")
            st = next((int(l.split()[2]) / 1e9 for l in text if l.startswith("start ")), None)
            en = next((int(l.split()[2]) / 1e9 for l in text if l.startswith("end ")), None)
            argv = next((l[5:] for l in text if l.startswith("argv ")), None)

            def ts(name):
                e = ev.get(name)
                return datetime.datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=datetime.timezone.utc).timestamp() if e else None

            cs, ce = ts("connect-start"), ts("connect-end")
            if rc == 0 and None not in (st, en, cs, ce):
                rows.append({"total": t, "to_start": (cs - wall0), "request_to_ssh": st - cs,
                             "ssh": en - st, "ssh_to_reply": ce - en})
    finally:
        w.write_config(base)
        wrapper.unlink()
    if not rows:
        return "(no successful instrumented login)"
    import statistics as stt

    def med(k):
        return stt.median(r[k] for r in rows) * 1e3

    out = [f"{len(rows)} bastion logins → web-01 with the onward ssh wrapped (medians, ms):",
           f"  spawn of the client → connect-start (hop 1, PAM session, broker, login shell): {med('to_start'):7.1f}",
           f"  connect-start → onward ssh started (GetSecretValue, parse, spawn):            {med('request_to_ssh'):7.1f}",
           f"  onward ssh start → exit (TCP, kex, agent auth, exec true, close):            {med('ssh'):7.1f}",
           f"  onward ssh exit → connect-end (reap, zeroize, audit):                          {med('ssh_to_reply'):7.1f}",
           f"  whole login:                                                                   {med('total'):7.1f}"]
    # The same ssh command line without the broker: the static key instead of the agent.
    if argv:
        args = argv.split()
        known = ref.dir / "known_hosts_alias"
        known.write_text(f"web-01 {w.targets['web-01'].host_key}\n")
        fixed = []
        i = 0
        while i < len(args):
            a = args[i]
            if a == "-E" and i + 1 < len(args):
                fixed += ["-E", str(ref.dir / "direct-ssh.log")]
                i += 2
                continue
            if a.startswith("IdentityAgent="):
                a = "IdentityAgent=none"
            elif a.startswith("IdentityFile="):
                a = f"IdentityFile={ref.static_key}"
            elif a.startswith("UserKnownHostsFile="):
                a = f"UserKnownHostsFile={known}"
            fixed.append(a)
            i += 1
        times = []
        for i in range(runs):
            t0 = time.perf_counter()
            r = subprocess.run(["/usr/bin/ssh", *fixed],
                               stdin=subprocess.DEVNULL, capture_output=True, env=ref.env)
            if r.returncode == 0:
                times.append(time.perf_counter() - t0)
        if times:
            out.append(f"  the same ssh command line run directly with the static key (no broker, no agent): "
                       f"{stt.median(times) * 1e3:.1f} ({len(times)} runs)")
        else:
            out.append(f"  (the same ssh command line without the broker failed: {r.stderr[-200:]!r})")
    return "\n".join(out)


def symbolized_helpers(repo: Path, workdir: Path, log=print) -> Optional[dict]:
    """The release profile strips symbols, which leaves perf with bare addresses. This builds
    the same code with symbols kept (``CARGO_PROFILE_RELEASE_STRIP=none``, same optimisation)
    into ``build/bench/target`` (its own target dir: the shared ``target/`` is untouched) and
    returns ``{"keys": path, "nss": path}``, or None when the build fails."""
    if not shutil.which("cargo"):
        return None
    target = workdir / "target"
    env = dict(os.environ, CARGO_PROFILE_RELEASE_STRIP="none", CARGO_TARGET_DIR=str(target))
    for argv in (["cargo", "build", "-q", "--release", "--locked", "--offline", "-p", "nss_kmsbastion"],
                 ["cargo", "build", "-q", "--release", "--locked", "--offline", "-p", "kmsbastion", "--no-default-features",
                  "--bin", "kmsbastion-keys"]):
        r = subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0:
            log(f"profile: symbolized build failed ({' '.join(argv)}): {r.stderr.strip()[-300:]}")
            return None
    out = {"keys": target / "release" / "kmsbastion-keys", "nss": target / "release" / "libnss_kmsbastion.so"}
    return out if all(p.is_file() for p in out.values()) else None
