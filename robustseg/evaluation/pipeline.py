"""``evaluate(cfg)``: from a composed ``conf/evaluate.yaml`` to a directory of results.

Steps: resolve the target models (and the surrogate for transfer), check they share the data's label set, build
the attack suite, pick this shard's cases, run the :class:`~robustseg.evaluation.runner.Evaluator` (resuming from
the per-case JSONL), then, for a single shard or on ``merge=true``, summarise, check and report.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from robustseg.errors import ConfigError
from robustseg.evaluation import checks
from robustseg.evaluation.records import CaseLog, dedupe, read_records
from robustseg.evaluation.report import log_wandb, save_montage, write_outputs
from robustseg.evaluation.resolve import LoadedModel, check_compatible, resolve_model
from robustseg.evaluation.runner import Evaluator, SlidingWindow
from robustseg.evaluation.shard import log_path, merge_shards, parse_shard, shard_cases, write_manifest
from robustseg.evaluation.store import AdversarialStore, atomic_write_bytes
from robustseg.evaluation.suite import as_list, build_suite
from robustseg.evaluation.summary import summarise

log = logging.getLogger(__name__)


def _conf_dir() -> Path:
    from robustseg.config import CONF_DIR

    return CONF_DIR


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, else ``<runs_root>/eval/<data>-<whitebox|from-source>-<targets>`` (stable: reruns resume)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    targets = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(t)).name) for t in as_list(cfg.target))
    mode = f"from-{Path(str(cfg.source)).name}" if cfg.get("source") else "whitebox"
    return Path(cfg.runs_root) / "eval" / f"{cfg.data.name}-{mode}-{targets}"


def _models(cfg: DictConfig, data_names: list[str]) -> tuple[list[LoadedModel], LoadedModel | None]:
    specs = [str(t) for t in as_list(cfg.target)]
    if not specs:
        raise ConfigError("target: name at least one model, e.g. --target unet or target=[unet,unetr]")
    which = str(cfg.get("checkpoint", "best"))
    targets: list[LoadedModel] = []
    for spec in specs:
        model = resolve_model(spec, cfg.runs_root, data_names, which)
        if any(model.label == t.label for t in targets):
            model.label = f"{model.label}#{len(targets)}"
        targets.append(model)
    source = None
    if cfg.get("source"):
        source = resolve_model(str(cfg.source), cfg.runs_root, data_names, which)
        same = [t for t in targets if t.checkpoint_sha256 == source.checkpoint_sha256]
        source = same[0] if same else source  # a target that is also the surrogate is attacked white-box
    return targets, source


def _settings(cfg: DictConfig, targets, source, suite, n_cases: int) -> dict[str, Any]:
    window = cfg.data.get("intensity") or {}
    hu = (float(window["a_max"]) - float(window["a_min"])) if {"a_min", "a_max"} <= set(window) else None

    def budget(spec) -> str:
        if spec.eps is None:
            return f"{spec.label} {spec.budget}"
        text = f"{spec.label} {spec.budget} = {spec.eps:.5f}"
        return text + (f" (~{spec.eps * hu:.1f} HU)" if hu and cfg.data.get("modality") == "ct" else "")

    return {
        "data": f"{cfg.data.name} ({cfg.get('split', 'validation')}, {n_cases} case(s) in this run)",
        "targets": ", ".join(
            f"{t.label} [{t.model_name}, {Path(t.checkpoint).name} {t.checkpoint_sha256[:12]}]" for t in targets
        ),
        "threat model": (f"transfer from {source.label}" + (" + white-box" if cfg.get("also_whitebox") else ""))
        if source
        else "white-box (each target is its own source)",
        "attacks": "; ".join(budget(s) for s in suite),
        "attack_mode": f"{cfg.attack_mode} (pipeline: through the scoring sliding window; tiles: papers' protocol)",
        "sliding window": OmegaConf.to_container(cfg.sw, resolve=True),
        "NSD tolerance (mm)": cfg.metrics.nsd_tolerance_mm,
        "frequency bands (normalised DCT radius)": OmegaConf.to_container(cfg.frequency.bands, resolve=True)
        if cfg.get("frequency") and cfg.frequency.get("bands")
        else "off",
        "seed": cfg.seed,
        "shard": cfg.shard,
    }


def evaluate(cfg: DictConfig) -> Path:
    """Run (this shard of) the evaluation that ``cfg`` describes and return its output directory.

    Raises:
        ConfigError, CheckpointError, DataError: bad settings, unusable checkpoints or data (named).
    """
    out = output_dir(cfg)
    index, count = parse_shard(str(cfg.shard))
    if cfg.get("merge"):
        return finalize(cfg, out, count)
    if cfg.attack_mode not in ("pipeline", "tiles"):
        raise ConfigError(f"attack_mode={cfg.attack_mode!r}: expected 'pipeline' or 'tiles'")
    torch.manual_seed(int(cfg.seed))
    suite = build_suite(  # first: a bad attack name fails before any data or checkpoint is read
        [str(a) for a in as_list(cfg.attacks)],
        as_list(cfg.eps),
        as_list(cfg.get("q_max")),
        _conf_dir(),
        OmegaConf.to_container(cfg.attack_overrides, resolve=True) if cfg.get("attack_overrides") else {},
    )
    from robustseg.data import build_datamodule

    datamodule = build_datamodule(cfg.data)
    split = str(cfg.get("split", "validation"))
    cases = datamodule.validate().get(split)
    if not cases:
        raise ConfigError(f"split={split!r}: the dataset {cfg.data.name} has no such split or it is empty")
    case_ids = sorted(str(c["case_id"]) for c in cases)
    if cfg.get("max_cases"):
        case_ids = case_ids[: int(cfg.max_cases)]
    mine = shard_cases(case_ids, index, count)

    targets, source = _models(cfg, [str(cfg.data.name)])
    intensity = OmegaConf.to_container(cfg.data.intensity, resolve=True) if cfg.data.get("intensity") else None
    models = targets + ([source] if source else [])
    check_compatible(models, int(cfg.data.num_classes), cfg.data.get("class_names"), intensity)
    out.mkdir(parents=True, exist_ok=True)
    montage_cases = set(mine[: int(cfg.get("montage_cases", 1))])

    last_budget = {s.label: s.budget for s in suite}  # one montage per attack: its largest (last) budget

    def montage(src, tgt, spec, case_id, *volumes) -> None:
        if case_id in montage_cases and spec.budget == last_budget[spec.label]:
            name = f"{case_id}_{src.label}_to_{tgt.label}_{spec.label}.png"
            title = f"{spec.label}@{spec.budget} from {src.label} on {tgt.label}, case {case_id}"
            save_montage(out / "montages" / re.sub(r"[^A-Za-z0-9_.@-]+", "_", name), *volumes, title=title)

    bands = cfg.get("frequency", {}).get("bands") if cfg.get("frequency") else None
    evaluator = Evaluator(
        targets,
        source,
        suite,
        AdversarialStore(out / "adversarial"),
        CaseLog(log_path(out, index, count)),
        window=SlidingWindow(
            overlap=float(cfg.sw.overlap),
            sw_batch_size=int(cfg.sw.sw_batch_size),
            blend_mode=str(cfg.sw.blend_mode),
            roi_size=tuple(cfg.sw.roi_size) if cfg.sw.get("roi_size") else None,
        ),
        mode=str(cfg.attack_mode),
        memory_bounded=bool(cfg.memory_bounded),
        seed=int(cfg.seed),
        nsd_tolerance_mm=float(cfg.metrics.nsd_tolerance_mm),
        bands=OmegaConf.to_container(bands, resolve=True) if bands else None,
        max_zero_grad_fraction=float(cfg.checks.max_zero_grad_fraction),
        montage=montage,
        also_whitebox=bool(cfg.get("also_whitebox", False)),
    )
    keys = [k for c in mine for k in evaluator.keys(c)]
    write_manifest(out, index, count, mine, keys)
    run_file = out / f"run.shard-{index}-of-{count}.json"
    if run_file.exists() and all(evaluator.done(k) for k in keys):
        # a finished shard: nothing to compute; its run file keeps the flags and costs it measured
        log.info("shard %d/%d: all %d results already in %s; nothing to do", index, count, len(keys), out)
        return finalize(cfg, out, count) if count == 1 else out
    dataset = datamodule.eval_dataset(split)
    position = {str(c["case_id"]): i for i, c in enumerate(cases)}
    stats = evaluator.run(dataset[position[c]] for c in mine)
    flags = [f.to_dict() for f in evaluator.flags]
    payload = {
        "flags": flags,
        "stats": {
            "attack generations (this run)": stats.generations,
            "adversarial volumes reused from the store": stats.reused_volumes,
            "sources x attacks x cases": len(evaluator.plan()) * len(suite) * len(mine),
            **{f"attack {k}": v for k, v in stats.attack_passes.items()},
            **{f"scoring {k}": v for k, v in stats.score_passes.items()},
            "records written": stats.records_written,
            "records skipped (already done)": stats.records_skipped,
            "seconds": round(stats.seconds, 1),
        },
        "settings": _settings(cfg, targets, source, suite, len(mine)),
    }
    atomic_write_bytes(run_file, json.dumps(payload, indent=1, default=str).encode())
    log.info("shard %d/%d: %s", index, count, payload["stats"])
    if count == 1:
        return finalize(cfg, out, count)
    log.info("shard %d/%d done; combine with: python evaluate.py ... shard=0/%d merge=true", index, count, count)
    return out


def finalize(cfg: DictConfig, out: Path, count: int) -> Path:
    """Merge the shards' records, compute the summary and the flags, write every output and the W&B run."""
    records = merge_shards(out, count) if count > 1 else dedupe(read_records(log_path(out, 0, 1)))
    runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"run.shard-*-of-{count}.json"))]
    rows = summarise(records)
    flags = [checks.Flag(**f) for run in runs for f in run["flags"]]
    flags += checks.check_monotonic(rows, float(cfg.checks.monotonic_tolerance))
    flags += checks.check_transfer_vs_whitebox(rows, [str(a) for a in as_list(cfg.checks.noise_attacks)])
    flags.append(checks.check_budget(records))
    flags.append(checks.audit_store(out / "adversarial"))
    stats: dict[str, Any] = {}
    for run in runs:
        for k, v in run["stats"].items():
            stats[k] = stats.get(k, 0) + v if isinstance(v, (int, float)) else v
    settings = dict(runs[-1]["settings"]) if runs else {}
    settings["shards"] = count
    flag_dicts = [f.to_dict() for f in flags]
    paths = write_outputs(out, rows, flag_dicts, settings, stats)
    config = OmegaConf.to_container(cfg, resolve=True)
    log_wandb(
        config.get("logger"), out, rows, flag_dicts, stats, [p for p in paths.values() if p.suffix == ".png"], config
    )
    raised = [f for f in flags if f.raised]
    for f in raised:
        log.warning("sanity flag raised: %s: %s", f.name, f.detail)
    log.info("report: %s (%d flag(s) raised)", paths["report"], len(raised))
    return out
