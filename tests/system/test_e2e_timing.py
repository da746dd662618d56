"""How long a bastion login takes next to a direct login to the same target.

The figures (medians of several runs; each run is a complete `ssh … true` with a fresh
connection) are printed and written to ``<log dir>/timings.txt``, which ``tests/system/run``
keeps as ``build/system-logs/timings.txt``.
"""

import datetime

from world import median_seconds

RUNS = 7


def test_bastion_login_time_next_to_a_direct_login(world):
    results = {}
    for target in world.targets:
        login = world.login("alice", target)

        def via_bastion():
            r = world.ssh(login, "true")
            assert r.returncode == 0, r.stderr

        def direct():
            r = world.direct_ssh(target, "true")
            assert r.returncode == 0, r.stderr

        via_bastion()  # warm caches (page cache, first emulator connection) before measuring
        direct()
        results[target] = (median_seconds(via_bastion, RUNS), median_seconds(direct, RUNS))
    lines = [f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%M:%SZ}: median of {RUNS} "
             "complete logins (`ssh … true`), seconds"]
    for target, (bastion, direct_s) in results.items():
        kind = world.targets[target].sub_type
        lines.append(f"{target} ({kind}): bastion {bastion:.3f}  direct {direct_s:.3f}  "
                     f"overhead {bastion - direct_s:+.3f}  ratio {bastion / direct_s:.2f}")
    text = "\n".join(lines) + "\n"
    with open(world.log_dir / "timings.txt", "a") as f:
        f.write(text)
    print("\n" + text)
    for target, (bastion, direct_s) in results.items():
        # A bastion login is two SSH logins plus one KMS call; anything near the KMS deadline
        # means something waits that should not.
        assert bastion < direct_s + world.kms_deadline_ms / 1000 / 2, (target, bastion, direct_s)
