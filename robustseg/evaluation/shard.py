"""Split an evaluation over ``n`` processes (``shard=i/n``) and merge their logs with nothing lost or duplicated.

Shard ``i`` of ``n`` takes the cases at positions ``i, i + n, i + 2n, ...`` of the sorted case ids, writes its
records to ``cases.shard-<i>-of-<n>.jsonl`` and a manifest naming the cases it owns. The merge reads every
shard's manifest and log, checks that the manifests of all ``n`` shards exist and partition the case set, and
that the shards ran with the same settings (their run identities; the differing settings are named otherwise)
and that every expected (source, target, attack, budget, case) key has a record of the expected identity, then
returns exactly those records. Running on
one device is ``shard=0/1``. This replaces ``trainer.test`` under DDP, whose padded sampler duplicates cases.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustseg.errors import ConfigError
from robustseg.evaluation.identity import differences
from robustseg.evaluation.records import read_records, select
from robustseg.evaluation.store import atomic_write_bytes

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(spec: str | Sequence[int]) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    if isinstance(spec, str):
        match = _SHARD.match(spec)
        if not match:
            raise ConfigError(f"shard={spec!r}: expected 'i/n' such as '0/4' (shard i of n, counting from 0)")
        index, count = int(match[1]), int(match[2])
    else:
        index, count = (int(v) for v in spec)
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard={index}/{count}: need n >= 1 and 0 <= i < n")
    return index, count


def shard_cases(case_ids: Sequence[str], index: int, count: int) -> list[str]:
    """The case ids of shard ``index`` of ``count``: round-robin over the sorted ids."""
    if len(set(case_ids)) != len(case_ids):
        dup = sorted({c for c in case_ids if list(case_ids).count(c) > 1})
        raise ConfigError(f"case ids must be unique to shard them; duplicated: {dup}")
    return sorted(case_ids)[index::count]


def log_path(output_dir: str | Path, index: int, count: int) -> Path:
    """The per-case JSONL of one shard."""
    return Path(output_dir) / f"cases.shard-{index}-of-{count}.jsonl"


def manifest_path(output_dir: str | Path, index: int, count: int) -> Path:
    return Path(output_dir) / f"manifest.shard-{index}-of-{count}.json"


def write_manifest(
    output_dir: str | Path,
    index: int,
    count: int,
    case_ids: Sequence[str],
    keys: Sequence,
    *,
    settings_ids: Sequence[str] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> Path:
    """Record which cases and result keys shard ``index`` owns, so the merge can prove completeness.

    Written twice: at the start (cases and keys: the partition) and when the shard finishes, with the
    ``settings_ids`` of its results (their identities) and the shard's run ``identity``; only then is it
    ``complete``.
    """
    path = manifest_path(output_dir, index, count)
    payload = {
        "shard": [index, count],
        "case_ids": list(case_ids),
        "keys": [list(k) for k in keys],
        "settings_ids": list(settings_ids) if settings_ids is not None else None,
        "identity": dict(identity) if identity is not None else None,
        "complete": settings_ids is not None,
    }
    atomic_write_bytes(path, json.dumps(payload, indent=1, default=str).encode())
    return path


def read_manifests(output_dir: str | Path, count: int) -> list[dict[str, Any]]:
    """The ``count`` shards' manifests; raises unless all exist, are complete and partition the cases.

    Raises:
        ConfigError: a manifest is missing or unfinished, or two shards claim the same case.
    """
    output_dir = Path(output_dir)
    manifests, seen_cases = [], {}
    for index in range(count):
        path = manifest_path(output_dir, index, count)
        if not path.exists():
            raise ConfigError(f"merge: shard {index}/{count} has no manifest {path}; run that shard first")
        manifest = json.loads(path.read_text())
        if not manifest.get("complete"):
            raise ConfigError(
                f"merge: shard {index}/{count} has not finished ({path} is not complete); rerun that shard "
                "(finished results are skipped)"
            )
        for case in manifest["case_ids"]:
            if case in seen_cases:
                raise ConfigError(f"merge: case {case!r} is claimed by shards {seen_cases[case]} and {index}")
            seen_cases[case] = index
        manifests.append(manifest)
    return manifests


def check_same_identity(manifests: Sequence[Mapping[str, Any]]) -> None:
    """Refuse to merge shards run with different settings, naming every differing setting.

    Raises:
        ConfigError: listing ``setting: shard 0 value != shard i value`` lines.
    """
    first = manifests[0].get("identity") or {}
    for m in manifests[1:]:
        diff = differences(first, m.get("identity") or {})
        if diff:
            i, n = m["shard"]
            raise ConfigError(
                f"merge: shard {i}/{n} was run with other settings than shard 0/{n}; rerun it with the same "
                "settings (values: shard 0 != shard " + str(i) + "):\n  " + "\n  ".join(diff[:20])
            )


def merge_shards(output_dir: str | Path, count: int) -> list[dict[str, Any]]:
    """The records of exactly the ``count`` shards' results (keys and identities) in ``output_dir``.

    Older records in the logs (other settings, other budgets) stay on disk and are not returned.

    Raises:
        ConfigError: a manifest is missing or unfinished, two shards claim the same case, the shards' settings
            differ (named), or an expected result has no record.
    """
    output_dir = Path(output_dir)
    manifests = read_manifests(output_dir, count)
    check_same_identity(manifests)
    records, wanted = [], []
    for index, manifest in enumerate(manifests):
        records.extend(read_records(log_path(output_dir, index, count)))
        wanted += [(tuple(k), sid) for k, sid in zip(manifest["keys"], manifest["settings_ids"])]
    merged, missing = select(records, wanted)
    if missing:
        raise ConfigError(
            f"merge: {len(missing)} result(s) missing, e.g. {[k for k, _ in missing[:3]]}; rerun the shard(s) of "
            "those cases (finished cases are skipped)"
        )
    return merged
