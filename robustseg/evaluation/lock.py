"""One writer per output directory (and shard): a lock file holding the owner's pid and host.

``evaluate.py`` takes ``<output_dir>/.lock.shard-<i>-of-<n>`` before writing anything else there and removes it
when done. A second process on the same directory and shard fails at once naming the owner (``lock: fail``,
the default) or waits until the owner is gone (``lock: wait``). A lock whose process is dead (same host, pid not
running) is stale: it is reported and taken over. A lock of another host cannot be checked; the message says how
to remove it by hand once that process is known to be gone. Shards of one evaluation lock separately, so a
SLURM array runs them in parallel; the merge takes ``.lock.merge`` and refuses while a shard is still held.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from robustseg.errors import RobustsegError

log = logging.getLogger(__name__)

POLICIES = ("fail", "wait")


class OutputLockedError(RobustsegError, RuntimeError):
    """Another live process writes the same output directory (and shard)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner recorded in a lock file, ``{}`` for an unreadable one, None when there is no lock."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def is_stale(owner: dict[str, Any]) -> bool:
    """Whether a lock's owner is a dead process on this host (other hosts cannot be checked: not stale)."""
    if owner.get("host") != socket.gethostname():
        return False
    try:
        return not _alive(int(owner["pid"]))
    except (KeyError, TypeError, ValueError):
        return True  # a lock file without a pid of this host: a crashed write, nobody can own it


def held(path: Path) -> dict[str, Any] | None:
    """The live owner of the lock at ``path``, or None when it is free or stale."""
    owner = read_owner(path)
    if owner is None or is_stale(owner):
        return None
    return owner


class OutputLock:
    """Exclusive lock file; use as a context manager.

    Args:
        path: the lock file (its directory must exist).
        policy: ``fail`` (raise at once when held) or ``wait`` (poll until free).
        poll_s: seconds between polls when waiting.
    """

    def __init__(self, path: str | Path, policy: str = "fail", poll_s: float = 2.0) -> None:
        if policy not in POLICIES:
            from robustseg.errors import ConfigError

            raise ConfigError(f"lock={policy!r}: expected one of {list(POLICIES)}")
        self.path = Path(path)
        self.policy = policy
        self.poll_s = poll_s
        self.owned = False

    def _try(self) -> bool:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(owner))
        return True

    def acquire(self) -> OutputLock:
        while True:
            if self._try():
                self.owned = True
                return self
            owner = read_owner(self.path)
            if owner is None:
                continue  # released between our attempt and the read
            if is_stale(owner):
                log.warning("removing the stale lock %s of a dead process %s", self.path, owner)
                self.path.unlink(missing_ok=True)
                continue
            if self.policy == "fail":
                raise OutputLockedError(
                    f"{self.path.parent} is being written by another evaluation (pid {owner.get('pid')} on "
                    f"{owner.get('host')}, since {owner.get('since')}; lock file {self.path}). Wait for it, pass "
                    "lock=wait to queue behind it, or use another output_dir; if that process is gone (another "
                    "host), delete the lock file"
                )
            log.info("waiting for %s (held by pid %s on %s)", self.path, owner.get("pid"), owner.get("host"))
            time.sleep(self.poll_s)

    def release(self) -> None:
        if self.owned:
            self.path.unlink(missing_ok=True)
            self.owned = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
