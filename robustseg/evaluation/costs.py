"""What the results cost, accumulated over every run that produced them (resumed runs included).

Each record carries the cost of the work that produced it (``cost``: attack and scoring passes and windows,
whether its adversarial volume was crafted or reused, seconds); the volume's crafting cost goes with the first
record that needed it. Work outside records (the sanity checks, wall time of each invocation) is appended to
``costs.shard-<i>-of-<n>.jsonl``, one line per finished invocation, tagged with the run identity. The Cost
section of a report sums the records of exactly that run and the lines of its identity, so a run killed and
resumed reports all the work that produced its numbers, and older results in the folder never count.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustseg.evaluation.records import read_records

PASSES = ("forwards", "windows", "backwards")


@dataclass
class RunStats:
    """What this process spent: attack generations and network passes, by phase (checks are ``overhead``)."""

    generations: int = 0
    reused_volumes: int = 0
    attack_passes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))
    score_passes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))
    overhead_passes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PASSES, 0))
    records_written: int = 0
    records_skipped: int = 0
    seconds: float = 0.0

    def add(self, phase: dict[str, int], before: dict[str, int], after: dict[str, int]) -> None:
        for k in phase:
            phase[k] += after[k] - before[k]


def costs_path(out: Path, index: int, count: int) -> Path:
    return Path(out) / f"costs.shard-{index}-of-{count}.jsonl"


def append_cost(
    out: Path,
    index: int,
    count: int,
    identity_sha256: str,
    seconds: float,
    written: int,
    skipped: int,
    overhead: Mapping[str, int],
) -> None:
    """Append one finished invocation's line (single write + fsync, like the records)."""
    line = {
        "identity_sha256": identity_sha256,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(float(seconds), 3),
        "records written": int(written),
        "records skipped": int(skipped),
        **{k: int(v) for k, v in overhead.items()},
    }
    with open(costs_path(out, index, count), "ab") as f:
        f.write((json.dumps(line, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_costs(out: Path, count: int, identity_sha256: str) -> list[dict[str, Any]]:
    """Every shard's invocation lines of one run identity."""
    lines = []
    for index in range(count):
        lines += [r for r in read_records(costs_path(out, index, count)) if r.get("identity_sha256") == identity_sha256]
    return lines


def total_costs(records: Iterable[Mapping[str, Any]], invocations: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The Cost section: generations, passes by phase, seconds, over the records and invocations given."""
    records, invocations = list(records), list(invocations)
    costs = [r.get("cost") or {} for r in records]
    total: dict[str, Any] = {
        "attack generations": sum(int(c.get("generated", 0)) for c in costs),
        "adversarial volumes reused from the store": sum(int(c.get("reused_volume", 0)) for c in costs),
        "sources x attacks x cases": len(
            {(r["source"], r["attack"], r["budget"], r["case_id"]) for r in records if r["source"]}
        ),
    }
    for phase in ("attack", "score"):
        for k in PASSES:
            name = "scoring" if phase == "score" else "attack"
            total[f"{name} {k}"] = sum(int(c.get(f"{phase}_{k}", 0)) for c in costs)
    for k in PASSES:
        total[f"check {k}"] = sum(int(i.get(f"check {k}", 0)) for i in invocations)
    total["records"] = len(records)
    total["invocations (finished runs with these settings)"] = len(invocations)
    total["seconds producing the results"] = round(sum(float(c.get("seconds", 0.0)) for c in costs), 1)
    total["seconds of finished invocations"] = round(sum(float(i.get("seconds", 0.0)) for i in invocations), 1)
    return total
