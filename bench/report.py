"""RESULTS.md and the closing ``bench: …`` lines."""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field
from typing import Optional

from stats import Samples, ms, us


@dataclass
class Results:
    machine: dict
    args: dict
    started: datetime.datetime
    finished: Optional[datetime.datetime] = None
    duration_s: float = 0.0
    helpers: dict = field(default_factory=dict)
    logins: dict = field(default_factory=dict)
    sequential_brokers: dict = field(default_factory=dict)
    concurrency: list = field(default_factory=list)
    large_logins: Optional[Samples] = None
    timelines: dict = field(default_factory=dict)
    profiles: dict = field(default_factory=dict)
    profile_note: str = ""
    errors: list = field(default_factory=list)


def _ratio(r: Results, target: str) -> float:
    lr = r.logins.get(target)
    if not lr:
        return float("nan")
    b, p = lr.samples["bastion"].median, lr.samples["proxyjump"].median
    return b / p if p and not math.isnan(b) else float("nan")


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def figures(r: Results) -> dict:
    """The seven headline figures (NaN where a part did not run)."""
    akc = r.helpers.get("akc")
    nss = r.helpers.get("nss")
    conc = r.concurrency[0] if r.concurrency else None
    brokers = dict(r.sequential_brokers)
    for c in r.concurrency:
        brokers.update({("c", id(c), k): v for k, v in c.brokers.items()})
    peak = max((b["hwm"] for b in brokers.values()), default=None)
    return {
        "login_ratio_key": _ratio(r, "web-01"),
        "login_ratio_password": _ratio(r, "web-02"),
        "akc_median_ms": akc["warm"].median * 1e3 if akc else float("nan"),
        "nss_median_us": nss["warm"].median * 1e6 if nss else float("nan"),
        "concurrent_failures": conc.failures if conc else None,
        "broker_rss_mib": peak / 1024 if peak else float("nan"),
        "getsecretvalue_per_connection": conc.gsv_per_connection if conc else float("nan"),
    }


def final_lines(r: Results) -> list[str]:
    f = figures(r)
    cf = f["concurrent_failures"]
    return [
        f"bench: login_ratio_key = {_fmt(f['login_ratio_key'])}",
        f"bench: login_ratio_password = {_fmt(f['login_ratio_password'])}",
        f"bench: akc_median_ms = {_fmt(f['akc_median_ms'])}",
        f"bench: nss_median_us = {_fmt(f['nss_median_us'])}",
        f"bench: concurrent_failures = {cf if cf is not None else 'n/a'}",
        f"bench: broker_rss_mib = {_fmt(f['broker_rss_mib'])}",
        f"bench: getsecretvalue_per_connection = {_fmt(f['getsecretvalue_per_connection'])}",
    ]


def _met(ok: Optional[bool]) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**MISSED**")


def _cmp(x, limit, exact: bool = False) -> Optional[bool]:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return x == limit if exact else x <= limit


def _row(s: Samples, unit=ms) -> str:
    return f"| {s.name} | {s.n} | {unit(s.median)} | {unit(s.p(0.95))} | {unit(s.minimum)} | {unit(s.maximum)} |"


def _concurrency_setup(c) -> str:
    """How the jump sshd was set up for a concurrency run, in words."""
    if c.jump_setup == "stock":
        return (f"jump with stock MaxStartups {c.jump_max_startups} (the drop-in as "
                "`enable --keep-max-startups` installs it), for comparison")
    what = "jump as `kmsbastion enable` configures it"
    if c.variant != "bastion":
        what = "the reference: plain `ssh -J` through the same jump sshd"
    return f"{what} (MaxStartups {c.jump_max_startups} from the shipped drop-in)"


def markdown(r: Results, targets: dict) -> str:
    f = figures(r)
    m = r.machine
    out = [
        "# kmsbastion benchmark results",
        "",
        f"Written by `make bench` (`bench/run`) on {r.started.strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{r.duration_s / 60:.1f} min. Method and caveats: `bench/README.md`.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| `nproc` | {m.get('nproc')} |",
        f"| CPU | {m.get('cpu')} |",
        f"| memory | {m.get('memory')} |",
        f"| kernel | {m.get('kernel')} |",
        f"| OpenSSH | {m.get('openssh')} |",
        f"| OS | {m.get('os')} |",
        f"| load average at start / end | {m.get('load')} / {m.get('load_end', '?')} |",
        f"| commit | {m.get('commit')} |",
        "",
        "## Summary",
        "",
        "| figure | value | target | |",
        "|---|---|---|---|",
        f"| login_ratio_key (bastion / ProxyJump median, key target) | {_fmt(f['login_ratio_key'])} | ≤ {targets['login_ratio']} | {_met(_cmp(f['login_ratio_key'], targets['login_ratio']))} |",
        f"| login_ratio_password (same, password target) | {_fmt(f['login_ratio_password'])} | ≤ {targets['login_ratio']} | {_met(_cmp(f['login_ratio_password'], targets['login_ratio']))} |",
        f"| akc_median_ms (warm, 2,000/500/5,000 configuration) | {_fmt(f['akc_median_ms'])} | ≤ {targets['akc_ms']} | {_met(_cmp(f['akc_median_ms'], targets['akc_ms']))} |",
        f"| nss_median_us (warm, in-process, same configuration) | {_fmt(f['nss_median_us'])} | ≤ {targets['nss_us']} | {_met(_cmp(f['nss_median_us'], targets['nss_us']))} |",
        f"| concurrent_failures ({r.args.get('concurrent')} at once, jump as `kmsbastion enable` configures it) | {f['concurrent_failures'] if f['concurrent_failures'] is not None else 'n/a'} | {targets['concurrent_failures']} | {_met(_cmp(f['concurrent_failures'], targets['concurrent_failures'], True))} |",
        f"| broker_rss_mib (peak VmHWM of any broker) | {_fmt(f['broker_rss_mib'])} | ≤ {targets['broker_rss_mib']} | {_met(_cmp(f['broker_rss_mib'], targets['broker_rss_mib']))} |",
        f"| getsecretvalue_per_connection (concurrent run) | {_fmt(f['getsecretvalue_per_connection'])} | = 1 | {_met(_cmp(f['getsecretvalue_per_connection'], 1.0, True))} |",
        "",
    ]
    notes = []
    nss = r.helpers.get("nss")
    if nss:
        notes.append(f"`nss_median_us` is the warm in-process lookup. The first lookup in a process (such as "
                     f"sshd's per-connection process) reads the lookup index: {ms(nss['cold'].median)} ms with this "
                     f"configuration" + (f"; with a stale index it parses the whole file: {ms(nss['stale'].median)} ms."
                                         if nss.get("stale") and nss["stale"].n else "."))
    akc_h = r.helpers.get("akc")
    if akc_h and akc_h.get("stale") is not None and akc_h["stale"].n:
        notes.append(f"`akc_median_ms` answers from the lookup index (`kmsbastion index`); with a stale index "
                     f"(full-parse fallback) one call takes {ms(akc_h['stale'].median)} ms.")
    if r.large_logins is not None and r.large_logins.n:
        notes.append(f"A whole bastion login with that configuration installed takes {ms(r.large_logins.median)} ms "
                     "(section 2).")
    for c in r.concurrency[1:]:
        notes.append(f"{c.n} logins at once, {_concurrency_setup(c)}: {c.failures} failures.")
    if notes:
        out += [*(f"- {n}" for n in notes), ""]
    if r.errors:
        out += ["## Errors", "", "The run did not complete:", "", "```", *[e.strip() for e in r.errors], "```", ""]

    out += ["## 1. Login overhead", "",
            f"Wall time from spawning `ssh` to its exit after the remote `true`; {r.args.get('runs')} runs per "
            "variant, interleaved (the order rotates each round), after 3 warm-up rounds. `bastion`: "
            "`ssh alice@ACCOUNT@TARGET@jump true`; `proxyjump`: `ssh -J admin@jump ACCOUNT@TARGET true` "
            "(a local jump-host user with a static ed25519 key; the target with a static RSA-2048 key, "
            "or its password via `SSH_ASKPASS`); `direct`: client → target with the same static credential.",
            ""]
    for target, kind in (("web-01", "key secret (RSA-2048 PEM), root"), ("web-02", "password secret, deploy")):
        lr = r.logins.get(target)
        if not lr:
            continue
        b, p, d = (lr.samples[n] for n in ("bastion", "proxyjump", "direct"))
        out += [f"### {target} ({kind})", "",
                "| variant | runs | median ms | p95 ms | min ms | max ms |", "|---|---|---|---|---|---|",
                _row(b), _row(p), _row(d), "",
                f"- ratio bastion / ProxyJump (medians): **{_fmt(b.median / p.median if p.n else float('nan'))}**; "
                f"bastion − ProxyJump: {ms(b.median - p.median)} ms; bastion / direct: {_fmt(b.median / d.median if d.n else float('nan'))}",
                f"- failures: " + ", ".join(f"{k} {v}" for k, v in lr.failures.items()),
                f"- KMS GetSecretValue during the timed runs: {lr.getsecretvalue} for {lr.onward} onward connections "
                f"({lr.bastion_ok} successful bastion logins)", ""]
        if lr.errors:
            out += ["```", *lr.errors, "```", ""]
    if r.sequential_brokers:
        hwm = [v["hwm"] for v in r.sequential_brokers.values()]
        out += [f"Broker memory during these logins: {len(hwm)} brokers seen, peak VmHWM "
                f"{max(hwm) / 1024:.2f} MiB (median {sorted(hwm)[len(hwm) // 2] / 1024:.2f} MiB).", ""]

    out += ["## 2. Helpers", ""]
    h = r.helpers
    if "gen" in h:
        g = h["gen"]
        out += [f"Generated configuration (`bench/genconfig.py`, valid per the loader): {g.engineers} engineers, "
                f"{g.hosts} hosts, {g.grants} grants, {len(g.text) / 1024:.0f} KiB. Probe login `{g.probe_login}` "
                "(last engineer, last host, last grant: the worst case for linear scans).", ""]
    if "akc" in h:
        a = h["akc"]
        out += ["AuthorizedKeysCommand: `kmsbastion-keys --config FILE USER KEYTYPE KEY`, spawned with "
                "`posix_spawn`, output to /dev/null (checked once beforehand: it prints the probe key). "
                "It answers from the configuration's lookup index, built beforehand with the real "
                f"`kmsbastion index` (`{h.get('index', '')}`). "
                "Cold = binary, configuration and index evicted from the page cache (`posix_fadvise DONTNEED`; "
                "the index lives on the tmpfs /run, so it stays in memory), warm = the following calls; "
                "index stale = the configuration changed since the index was built, every call parses the "
                "whole file (the fallback).", "",
                "| measurement | runs | median ms | p95 ms | min ms | max ms |", "|---|---|---|---|---|---|",
                _row(a["cold"]), _row(a["warm"])]
        if a.get("stale") is not None:
            out.append(_row(a["stale"]))
        out.append(_row(a["floor"]))
        if "akc_small" in h:
            s = h["akc_small"]
            s["warm"].name = "akc warm, the World's 4-engineer configuration"
            out.append(_row(s["warm"]))
        out += ["", f"Output for the probe login: `{a['output'][:160]}…`", ""]
    if "nss" in h:
        n = h["nss"]
        out += ["NSS: `_nss_kmsbastion_getpwnam_r` of `target/release/libnss_kmsbastion.so`, in-process "
                "(ctypes), one call per sample. Cold = first lookup after the configuration file changed and "
                "its index was rebuilt (the module verifies the index and decodes the records it needs, as "
                "the first lookup of every new process does); cold, index stale = first lookup after a change "
                "without a rebuild (the module parses the whole file); warm = repeated lookups.", "",
                "| measurement | calls | median µs | p95 µs | min µs | max µs |", "|---|---|---|---|---|---|",
                _row(n["cold"], us)]
        if n.get("stale") is not None:
            out.append(_row(n["stale"], us))
        out += [_row(n["warm"], us), _row(n["miss"], us)]
        if h.get("glibc_small"):
            g2 = h["glibc_small"]
            g2.name = "glibc getpwnam via nsswitch, World's small configuration"
            out.append(_row(g2, us))
        out += ["", f"Entry returned: `{n['entry']}`", ""]
    if r.large_logins is not None:
        s = r.large_logins
        out += ["### A whole login with the large configuration installed", "",
                "The World's configuration plus the generated 2,000/500/5,000 inventory, then bastion logins "
                "→ web-01 (sshd resolves the user in a fresh process per connection, so its NSS lookups are "
                "cold; the AKC, PAM module, login shell and broker each load the configuration too). The "
                "first login after the configuration is written finds no index: it parses the whole file, "
                "and its PAM module writes the index, which the later logins use.", "",
                "| measurement | runs | median ms | p95 ms | min ms | max ms |", "|---|---|---|---|---|---|",
                _row(s), ""]
        if s.note:
            out += ["```", s.note, "```", ""]

    out += ["## 3. Concurrency", "",
            "Logins released by one barrier. The headline run uses the jump host as `kmsbastion enable` "
            "configures it (the shipped drop-in, its `MaxStartups` included); the targets keep stock sshd "
            "settings, so the onward connections of the burst meet OpenSSH's default `MaxStartups` there. "
            "MaxStartups values are what `sshd -T` shows.", ""]
    for c in r.concurrency:
        hwm = [v["hwm"] for v in c.brokers.values()]
        rss = [v["rss"] for v in c.brokers.values()]
        out += [f"### {c.n} {c.variant} logins → web-01 at once, {_concurrency_setup(c)}", "",
                f"- jump sshd MaxStartups {c.jump_max_startups}, target sshd MaxStartups {c.target_max_startups}",
                f"- failures: **{c.failures}** of {c.n}; all finished after {c.wall:.2f} s"
                + (f" (refused by the jump sshd: {c.hops.get('jump', 0)}, by the target sshd: "
                   f"{c.hops.get('target', 0)}, other: {c.hops.get('other', 0)})" if c.failures else "")]
        if c.variant != "bastion":
            out += [f"- login time of the successful ones: p50 {ms(c.samples.median)} ms, p95 {ms(c.samples.p(0.95))} ms"]
        else:
            out += [f"- login time of the successful ones: p50 {ms(c.samples.median)} ms, p95 {ms(c.samples.p(0.95))} ms, "
                    f"max {ms(c.samples.maximum)} ms",
                    f"- brokers seen by the sampler: {len(hwm)}; peak VmHWM {max(hwm, default=0) / 1024:.2f} MiB, "
                    f"median VmHWM {c.broker_median_mib:.2f} MiB, peak VmRSS sampled {max(rss, default=0) / 1024:.2f} MiB",
                    f"- KMS GetSecretValue: {c.getsecretvalue} for {c.onward} onward connections "
                    f"(`connect-start` audit events) = **{_fmt(c.gsv_per_connection)}** per connection"]
        if c.causes:
            out += ["- failures by the client's last message: "
                    + "; ".join(f"{k} × `{cause}`" for cause, k in c.causes)]
        out += [""]
        if c.errors:
            out += ["First failures (client stderr):", "", "```", *c.errors[:4 if c.variant != "bastion" else 8],
                    "```", ""]

    if r.timelines:
        out += ["## Where the time goes: login timelines", "",
                "One login each with `ssh -v`: client debug lines (ms since spawn) merged with the jump "
                "host's audit events (wall clock, ms resolution).", ""]
        for (target, variant), text in r.timelines.items():
            out += [f"### {variant} → {target}", "", "```", text, "```", ""]
    if r.profiles:
        out += ["## Profiles of missed targets", "",
                "Helpers: `perf record -g` of one call, self time by DSO and symbol (`perf report "
                "--no-children`). Logins: `strace -f` attached to the jump sshd during one login.",
                *([r.profile_note] if r.profile_note else []), ""]
        for name, text in r.profiles.items():
            out += [f"### {name}", "", "```", text, "```", ""]
    return "\n".join(out) + "\n"
