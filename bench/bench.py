"""kmsbastion benchmarks (issue 7): run by ``bench/run`` inside ``tests/ns/run-in-ns``.

Measures, in one run on one machine: login overhead against plain OpenSSH ProxyJump (key and
password targets), the AuthorizedKeysCommand and the NSS lookup with a 2,000/500/5,000
configuration, and 50 concurrent logins (failures, latency, broker RSS, KMS calls). Writes
``bench/RESULTS.md`` and ends with the seven ``bench: …`` lines. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import genconfig  # noqa: E402
import helpers  # noqa: E402
import logins  # noqa: E402
import machine  # noqa: E402
import profiles as prof  # noqa: E402
import report  # noqa: E402

TARGETS = {
    "login_ratio": 1.10,
    "akc_ms": 2.0,
    "nss_us": 100.0,
    "concurrent_failures": 0,
    "broker_rss_mib": 8.0,
    "gsv_per_connection": 1.0,
}


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def big_world_config(w: logins.BenchWorld, gen: genconfig.Generated) -> str:
    """The World's configuration with the generated inventory appended (uid range widened),
    so a real login goes through sshd, NSS, the AKC and PAM with a 2,000/500/5,000 file."""
    # One uid range for both sets of engineers that holds no local user (65534 `nobody` lies
    # between the World's 64001… and the generated 100001…): move the World's engineers up.
    text = re.sub(r"^uid_min = \d+$", f"uid_min = {genconfig.UID_MIN}", w.config_text(), flags=re.M)
    text = re.sub(r"^uid_max = \d+$", f"uid_max = {genconfig.UID_MAX}", text, flags=re.M)
    text = re.sub(r"^uid = 64(\d{3})$", lambda m: f"uid = {190000 + int(m.group(1))}", text, flags=re.M)
    return text + "\n" + gen.body + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=30, help="timed logins per variant and target (default 30)")
    p.add_argument("--concurrent", type=int, default=50, help="simultaneous logins (default 50)")
    p.add_argument("--large-logins", type=int, default=3,
                   help="bastion logins with the large configuration installed (0 skips; default 3)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--no-profile", action="store_true", help="skip the profiles of missed targets")
    p.add_argument("--skip-helpers", action="store_true", help="skip part 2 (for quick iterations)")
    a = p.parse_args()
    if os.environ.get("KMSB_NS") != "1":
        print("bench.py runs inside tests/ns/run-in-ns; use bench/run", file=sys.stderr)
        return 2
    release = REPO / "target" / "release"
    work = REPO / "build" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    r = report.Results(machine=machine.details(REPO), args=vars(a), started=datetime.datetime.now(datetime.timezone.utc))
    log(f"machine: {r.machine}")

    # 1. Helpers, before the World exists (the NSS module's file is the namespace's own).
    if not a.skip_helpers:
        try:
            r.helpers = helpers.run(release, work, log=lambda m: log(m))
        finally:
            helpers.cleanup()
    perf_ok = prof.have_perf()
    if not a.no_profile and not a.skip_helpers:
        gen = r.helpers["gen"]
        akc_missed = r.helpers["akc"]["warm"].median * 1e3 > TARGETS["akc_ms"]
        nss_missed = r.helpers["nss"]["warm"].median * 1e6 > TARGETS["nss_us"]
        keys_bin, nss_lib = release / "kmsbastion-keys", release / "libnss_kmsbastion.so"
        if perf_ok and (akc_missed or nss_missed):
            log("profile: building the helpers with symbols for perf (build/bench/target)")
            sym = prof.symbolized_helpers(REPO, work, log=log)
            if sym:
                keys_bin, nss_lib = sym["keys"], sym["nss"]
                r.profile_note = ("perf ran on the same code built with symbols kept "
                                  "(`CARGO_PROFILE_RELEASE_STRIP=none`, into `build/bench/target`); "
                                  "the release binaries are stripped.")
        if akc_missed:
            key_type, key_b64 = gen.probe_key.split()[:2]
            log("profile: perf of one AuthorizedKeysCommand call (large configuration)")
            r.profiles["akc"] = prof.perf_top(
                [str(keys_bin), "--config", str(r.helpers["config"]), gen.probe_login,
                 key_type, key_b64], work, "akc", repeat=20)
        if nss_missed:
            log("profile: perf of one cold NSS lookup (large configuration)")
            helpers.NSS_CONFIG.parent.mkdir(parents=True, exist_ok=True)
            helpers.NSS_CONFIG.write_text(gen.text)
            try:
                r.profiles["nss_cold"] = prof.perf_top(
                    prof.nss_cold_argv(sys.executable, nss_lib, gen.probe_login, helpers.NSS_CONFIG),
                    work, "nss-cold")
            finally:
                helpers.cleanup()

    # 2. The World: logins and concurrency.
    w = logins.BenchWorld()
    log("world: starting (emulator, targets, jump host)")
    try:
        w.start()
        ref = logins.Reference(w)
        alice = w.engineers["alice"]
        r.helpers["akc_small"] = helpers.small_config_akc(
            w.bin("kmsbastion-keys"), Path("/etc/kmsbastion/kmsbastion.toml"), w.login("alice", "web-01"),
            alice.public_key)
        r.helpers["glibc_small"] = helpers.bench_glibc_getpwnam(w.login("alice", "web-01"))
        sampler = logins.BrokerSampler(w.bin("kmsbastion-broker"))
        sampler.start()
        try:
            for target in ("web-01", "web-02"):
                log(f"logins: {a.runs} interleaved runs per variant → {target}")
                r.logins[target] = logins.login_overhead(ref, target, a.runs, log=log)
        finally:
            sampler.stop()
        r.sequential_brokers = sampler.peak
        for target in ("web-01", "web-02"):
            for variant in ("bastion", "proxyjump"):
                r.timelines[(target, variant)] = prof.compact(
                    prof.login_timeline(ref, ref.variants[(target, variant)]))

        if not a.no_profile:
            for target in ("web-01", "web-02"):
                lr = r.logins[target]
                ratio = lr.samples["bastion"].median / lr.samples["proxyjump"].median
                if not ratio <= TARGETS["login_ratio"]:
                    log(f"profile: strace of one bastion login → {target} (ratio {ratio:.2f})")
                    r.profiles[f"strace of one bastion login → {target}"] = prof.strace_login(
                        ref, ref.variants[(target, "bastion")], work, w.daemons["sshd-jump"].process.pid)
                    if target == "web-01":
                        log("profile: the onward phase of key logins, with the onward ssh wrapped")
                        r.profiles["onward phase of bastion logins → web-01"] = prof.onward_breakdown(w, ref)

        # The headline: the jump host as `kmsbastion enable` configures it (the shipped drop-in,
        # MaxStartups included), targets with stock sshd settings.
        log(f"concurrency: {a.concurrent} bastion logins at once (jump as `kmsbastion enable` configures it, "
            f"MaxStartups {w.jump_max_startups()})")
        r.concurrency.append(logins.concurrency(ref, a.concurrent, log=log))
        # For comparison: the jump sshd with OpenSSH's MaxStartups 10:30:100 (the drop-in as
        # `enable --keep-max-startups` installs it), whose random early drop of
        # unauthenticated connections beyond 10 is what the drop-in's line is for.
        time.sleep(2)
        stock = w.set_jump_max_startups(logins.JUMP_STOCK)
        log(f"concurrency: again with the jump's stock MaxStartups {stock}")
        try:
            r.concurrency.append(logins.concurrency(ref, a.concurrent, log=log))
        finally:
            w.set_jump_max_startups(logins.JUMP_DROP_IN)
        # The reference: plain `ssh -J` through the same jump sshd as the headline.
        time.sleep(2)
        log(f"concurrency: the reference, {a.concurrent} ProxyJump logins at once (same jump sshd as the headline)")
        r.concurrency.append(logins.concurrency(ref, a.concurrent, variant="proxyjump", log=log))

        if a.large_logins > 0 and "gen" in r.helpers:
            log(f"logins with the large configuration installed: {a.large_logins} bastion logins → web-01")
            gen = r.helpers["gen"]
            w.write_config(big_world_config(w, gen))
            try:
                r.large_logins = logins.Samples("bastion → web-01, large configuration")
                v = ref.variants[("web-01", "bastion")]
                for i in range(a.large_logins):
                    t, rc = ref.run(v, ref.dir / "stderr-large")
                    if rc == 0:
                        r.large_logins.values.append(t)
                    else:
                        r.large_logins.note += f"run {i}: exit {rc}: {(ref.dir / 'stderr-large').read_text()[-300:]} "
                log(f"large-config login median {r.large_logins.median * 1e3:.0f} ms "
                    f"({r.large_logins.n} ok of {a.large_logins})")
                if not a.no_profile and r.large_logins.n:
                    log("profile: strace of one bastion login with the large configuration")
                    r.profiles["strace of one bastion login → web-01, large configuration"] = prof.strace_login(
                        ref, v, work, w.daemons["sshd-jump"].process.pid)
            finally:
                w.write_config()
            # A moment for the last session to close before the World stops.
            time.sleep(1)
    except Exception:
        r.errors.append(traceback.format_exc())
        log("ERROR:\n" + traceback.format_exc())
    finally:
        w.stop()
    r.finished = datetime.datetime.now(datetime.timezone.utc)
    r.machine["load_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    r.duration_s = time.monotonic() - started
    a.out.write_text(report.markdown(r, TARGETS))
    log(f"wrote {a.out}")
    lines = report.final_lines(r)
    print("\n".join(lines), flush=True)
    return 1 if r.errors else 0


if __name__ == "__main__":
    sys.exit(main())
