"""The W&B run of an evaluation: scalars, tables, plots, montages, flags and the report files.

What a user finds in the run (``job_type=evaluate``):

* summary scalars ``eval/dice/<attack>@<budget>[@<source>]/<target>`` (ARCHITECTURE 2.5; ``@<source>`` marks a
  transfer), ``eval/hd95/...`` and ``eval/nsd/...`` alike, ``flags/<name>`` (raised), ``flags/<name>/status``
  (``RAISED`` / ``ok`` / ``not checked``) and ``cost/*``;
* tables ``eval/summary`` (every summary column, the threat model included), ``eval/per_class`` (one line per
  row and class), ``eval/transfer_matrix`` (one line per source, target, attack and budget), ``eval/threat_model``
  and ``eval/flags``;
* images ``eval/plots/<name>`` and ``eval/montages/<name>``; the files ``report.md``, ``summary.csv`` and
  ``summary.json`` saved with the run.

W&B rejects a table whose column holds two types (a bool and a string, say), so every column is given one type
here (:func:`typed_table_data`). The run is ``offline`` unless an API key is configured, ``WANDB_MODE=disabled``
turns it off, nothing prompts, and the run and its service process are finished before returning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustseg.evaluation.summary import CLEAN, WORST
from robustseg.evaluation.tables import col, columns, flat_row, threat_text

PER_CLASS_METRICS = ("dice", "hd95", "nsd", "pooled_dice")
STATUS_RANK = ("ok", "not checked", "RAISED")


def _status(flag: Mapping[str, Any]) -> str:
    return "RAISED" if flag["raised"] else "ok" if flag.get("checked", True) else "not checked"


def _scalar_name(row: Mapping[str, Any]) -> str:
    name = CLEAN if row["attack"] == CLEAN else col(row)
    if row["attack"] != CLEAN and row["source"] != row["target"]:
        name += f"@{row['source']}"  # transfer from a surrogate, as ``eval/dice/pgd@unetr`` in ARCHITECTURE 2.5
    return f"{name}/{row['target']}"


def wandb_payload(
    rows: Sequence[Mapping[str, Any]], flags: Sequence[Mapping[str, Any]], stats: Mapping[str, Any]
) -> dict[str, Any]:
    """Summary scalars: ``eval/<metric>/<attack>@<budget>[@<source>]/<target>``, ``flags/*`` and ``cost/*``."""
    payload: dict[str, Any] = {}
    for r in rows:
        for metric in ("dice", "hd95", "nsd"):
            value = r.get(f"{metric}_mean")
            if isinstance(value, (int, float)) and math.isfinite(value):
                payload[f"eval/{metric}/{_scalar_name(r)}"] = float(value)
    for f in flags:
        key = f"flags/{f['name']}"
        payload[key] = bool(payload.get(key, False) or f["raised"])
        previous = payload.get(f"{key}/status", "ok")
        payload[f"{key}/status"] = max(previous, _status(f), key=STATUS_RANK.index)  # the worst of the name's flags
    payload.update({f"cost/{k}": v for k, v in stats.items() if isinstance(v, (int, float))})
    return payload


def _kind(values: Sequence[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return "bool"
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return "number"
    return "text"


def typed_table_data(records: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> list[list[Any]]:
    """Table rows in which every column has one type: bool, number (non-finite -> None) or text; None = missing."""
    kinds = {c: _kind([r.get(c) for r in records]) for c in cols}

    def convert(value: Any, kind: str) -> Any:
        if value is None or (value == "" and kind != "text"):
            return None
        if kind == "number":
            return float(value) if math.isfinite(float(value)) else None
        return value if kind == "bool" else str(value)

    return [[convert(r.get(c), kinds[c]) for c in cols] for r in records]


def _table(wandb: Any, records: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> Any:
    return wandb.Table(columns=list(cols), data=typed_table_data(records, cols))


def per_class_records(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per (row, class): dice, hd95, nsd and pooled Dice of that class, with the row's threat model."""
    out = []
    for r in rows:
        slugs = [k[len("dice_") :] for k in r if k.startswith("dice_") and k not in ("dice_mean", "dice_mean_bg")]
        for slug in slugs:
            entry = {k: r.get(k) for k in ("source", "target", "attack", "budget", "budget_value", "mode", "seed")}
            entry |= {"class": slug, "threat_model": threat_text(r)}
            entry |= {m: r.get(f"{m}_{slug}") for m in PER_CLASS_METRICS}
            out.append(entry)
    return out


def transfer_records(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The transfer matrix in long form: one record per (attack, budget, source, target)."""
    keys = ("attack", "budget", "budget_value", "source", "target", "kind", "dice_mean", "hd95_mean", "nsd_mean")
    picked = [r for r in rows if r["attack"] != CLEAN and r["source"] and not str(r["attack"]).startswith(WORST)]
    return [{**{k: r.get(k) for k in keys}, "threat_model": threat_text(r)} for r in picked]


def log_wandb(
    logger_cfg: Mapping[str, Any] | None,
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    stats: Mapping[str, Any],
    images: Sequence[Path],
    config: Mapping[str, Any],
) -> dict[str, Any]:
    """Log the evaluation to a W&B run when the logger is ``wandb`` and not disabled; returns the scalar payload.

    The run lives under ``$WANDB_DIR`` when set, else ``out_dir``.
    """
    payload = wandb_payload(rows, flags, stats)
    if not logger_cfg or logger_cfg.get("name") != "wandb":
        return payload
    from robustseg.loggers import wandb_mode

    mode = wandb_mode(str(logger_cfg.get("mode", "auto")))
    if mode == "disabled":
        return payload
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=logger_cfg.get("project", "robustseg"),
        entity=logger_cfg.get("entity"),
        name=f"evaluate-{out_dir.name}",
        job_type="evaluate",
        dir=os.environ.get("WANDB_DIR") or str(out_dir),
        mode=mode,
        config=dict(config),
        tags=list(logger_cfg.get("tags") or []),
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    try:
        flat = [flat_row(r) for r in rows]
        threat = [{"column": col(r), "source": r["source"], "threat_model": threat_text(r)} for r in rows]
        flag_cols = ["name", "status", "raised", "checked", "detail"]
        flag_records = [{**f, "status": _status(f), "checked": f.get("checked", True)} for f in flags]
        logged = {
            "eval/summary": _table(wandb, flat, columns(rows)),
            "eval/per_class": _table(
                wandb,
                per_class_records(rows),
                ["source", "target", "attack", "budget", "budget_value", "class", *PER_CLASS_METRICS, "mode"]
                + ["seed", "threat_model"],
            ),
            "eval/threat_model": _table(wandb, threat, ["column", "source", "threat_model"]),
            "eval/flags": _table(wandb, flag_records, flag_cols),
        }
        transfer = transfer_records(rows)
        if transfer:
            logged["eval/transfer_matrix"] = _table(wandb, transfer, list(transfer[0]))
        for p in images:
            group = "montages" if Path(p).parent.name == "montages" else "plots"
            logged[f"eval/{group}/{Path(p).stem}"] = wandb.Image(str(p))
        run.log(logged)
        for key, value in payload.items():
            run.summary[key] = value
        for name in ("report.md", "summary.csv", "summary.json"):
            if (out_dir / name).exists():
                run.save(str(out_dir / name), base_path=str(out_dir), policy="now")
    finally:
        run.finish()
        wandb.teardown()
    return payload
