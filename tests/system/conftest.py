"""Shared fixtures of the system tests (all opt-in: a test gets a world only by asking).

``world`` is a complete deployment (see ``world.py``): KMS emulator, two target sshd, the jump
sshd with kmsbastion's NSS module, AuthorizedKeysCommand, PAM module, broker and login shell.
One world per test module; its ``stop()`` puts the namespace's /etc back, so the NSS, AKC and
PAM tests in this directory see the namespace as ``run-in-ns`` made it.

Outside ``tests/ns/run-in-ns`` or without ``make build``, the fixture FAILS (it never skips):
a missing prerequisite must not look like a pass.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from world import World, WorldError  # noqa: E402


@pytest.fixture(scope="module")
def world():
    """A started :class:`world.World` for the module; stopped (and /etc restored) afterwards."""
    if os.environ.get("KMSB_NS") != "1":
        pytest.fail("system tests run only inside tests/ns/run-in-ns (use tests/system/run)", pytrace=False)
    w = World()
    try:
        w.start()
    except WorldError as e:
        pytest.fail(f"could not build the test world: {e}", pytrace=False)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def audit_mark(world):
    """The audit log position before the test: ``world.audit_since(audit_mark)``."""
    return world.audit_mark()
