"""Split an evaluation over ``n`` processes (``shard=i/n``) and merge their logs with nothing lost or duplicated.

Shard ``i`` of ``n`` takes the cases at positions ``i, i + n, i + 2n, ...`` of the sorted case ids, writes its
records to ``cases.shard-<i>-of-<n>.jsonl`` and a manifest naming the cases it owns. The merge reads every
shard's manifest and log, checks that the manifests of all ``n`` shards exist and partition the case set, and
that every expected (source, target, attack, budget, case) key has a record, then returns the union. Running on
one device is ``shard=0/1``. This replaces ``trainer.test`` under DDP, whose padded sampler duplicates cases.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustseg.errors import ConfigError
from robustseg.evaluation.records import dedupe, read_records, record_key
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


def write_manifest(output_dir: str | Path, index: int, count: int, case_ids: Sequence[str], keys: Sequence) -> Path:
    """Record which cases and result keys shard ``index`` owns, so the merge can prove completeness."""
    path = manifest_path(output_dir, index, count)
    payload = {"shard": [index, count], "case_ids": list(case_ids), "keys": [list(k) for k in keys]}
    atomic_write_bytes(path, json.dumps(payload, indent=1).encode())
    return path


def merge_shards(output_dir: str | Path, count: int) -> list[dict[str, Any]]:
    """All records of the ``count`` shards in ``output_dir``; raises if a shard or a case is missing or doubled.

    Raises:
        ConfigError: a manifest is missing, two shards claim the same case, or an expected key has no record.
    """
    output_dir = Path(output_dir)
    manifests, records, seen_cases = [], [], {}
    for index in range(count):
        path = manifest_path(output_dir, index, count)
        if not path.exists():
            raise ConfigError(f"merge: shard {index}/{count} has no manifest {path}; run that shard first")
        manifest = json.loads(path.read_text())
        for case in manifest["case_ids"]:
            if case in seen_cases:
                raise ConfigError(f"merge: case {case!r} is claimed by shards {seen_cases[case]} and {index}")
            seen_cases[case] = index
        manifests.append(manifest)
        records.extend(read_records(log_path(output_dir, index, count)))
    merged = dedupe(records)
    have = {record_key(r) for r in merged}
    missing = [tuple(k) for m in manifests for k in m["keys"] if tuple(k) not in have]
    if missing:
        raise ConfigError(
            f"merge: {len(missing)} result(s) missing, e.g. {missing[:3]}; rerun the shard(s) of those cases "
            "(finished cases are skipped)"
        )
    return merged
