"""Per-case result log: one JSON line per (source, target, attack, budget, case), crash-safe and resumable.

Each record is appended as one complete line with a single ``write`` followed by ``flush`` and ``fsync``, so
after ``kill -9`` the file holds every finished case and at most one truncated last line. Opening the log
repairs such a tail (the partial line is cut off and its case simply runs again), and the completed keys tell
the runner what to skip. Records are keyed by :func:`record_key` and their ``settings_id`` (the hash of the
result's identity, see ``identity.py``): a result recomputed under other settings is appended next to the old
one, which stays on disk untouched; :func:`select` picks exactly the records of one run's keys and identities.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEY_FIELDS = ("source", "target", "attack", "budget", "case_id")


def record_key(record: Mapping[str, Any]) -> tuple[str, ...]:
    """(source, target, attack, budget, case_id) of a record; clean records have source ``""``."""
    return tuple(str(record[k]) for k in KEY_FIELDS)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a JSONL file; a truncated or unparsable line is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                log.warning("%s:%d: ignoring a truncated last line (interrupted write)", path, lineno)
                break
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                log.warning("%s:%d: ignoring an unparsable line", path, lineno)
    return records


def repair(path: str | Path) -> int:
    """Cut a truncated last line off ``path``; return the number of bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything up to and including the last newline
    if keep == len(data):
        return 0
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning("%s: removed a truncated last line of %d bytes", path, len(data) - keep)
    return len(data) - keep


def identified_key(record: Mapping[str, Any]) -> tuple[tuple[str, ...], str | None]:
    """(record key, settings id) of a record."""
    return record_key(record), record.get("settings_id")


class CaseLog:
    """Append-only JSONL of per-case records, opened for resuming."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair(self.path)
        records = read_records(self.path)
        self.records = {record_key(r): r for r in records}  # the last record of each key
        self.by_identity = {identified_key(r): r for r in records}

    def done(self, key: tuple[str, ...], settings_id: str | None = None) -> bool:
        """Whether a record with ``key`` (made with ``settings_id``, when given) is already in the log."""
        if settings_id is None:
            return key in self.records
        return (tuple(key), settings_id) in self.by_identity

    def append(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one line: a single write, then flush and fsync before returning."""
        line = (json.dumps(record, sort_keys=True, default=_jsonable) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.records[record_key(record)] = dict(record)
        self.by_identity[identified_key(record)] = dict(record)

    def __len__(self) -> int:
        return len(self.records)


def dedupe(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Records with unique keys, the last occurrence winning, in first-seen order."""
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in records:
        out[record_key(r)] = dict(r)
    return list(out.values())


def select(
    records: Iterable[Mapping[str, Any]], wanted: Iterable[tuple[tuple[str, ...], str]]
) -> tuple[list[dict[str, Any]], list[tuple[tuple[str, ...], str]]]:
    """The records of exactly the ``wanted`` (key, settings id) pairs, in that order, and the missing pairs."""
    index = {identified_key(r): dict(r) for r in records}
    found, missing = [], []
    for key, sid in wanted:
        record = index.get((tuple(key), sid))
        if record is None:
            missing.append((tuple(key), sid))
        else:
            found.append(record)
    return found, missing


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
