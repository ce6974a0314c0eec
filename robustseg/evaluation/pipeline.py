"""``evaluate(cfg)``: from a composed ``conf/evaluate.yaml`` to a directory of results.

Steps: check the settings and the output location (nothing is written before they are valid), build the attack
suite, pick this shard's cases, resolve the target models (and the surrogate for transfer) with unique labels and
check their label set and training preprocessing against the data, lock the output directory (per shard), run
the :class:`~robustseg.evaluation.runner.Evaluator` (resuming from the per-case JSONL by result identity), then,
for a single shard or on ``merge=true``, summarise, check and report exactly this run's results.
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
from robustseg.evaluation import checks, validate
from robustseg.evaluation.costs import append_cost, read_costs, total_costs
from robustseg.evaluation.ensemble import cascade_predicate
from robustseg.evaluation.identity import data_preprocessing, short_hash
from robustseg.evaluation.lock import OutputLock, held
from robustseg.evaluation.modelinfo import check_preprocessing, unique_labels
from robustseg.evaluation.records import CaseLog
from robustseg.evaluation.report import log_wandb, save_montage, write_outputs
from robustseg.evaluation.resolve import LoadedModel, check_compatible, resolve_model
from robustseg.evaluation.runner import Evaluator, SlidingWindow
from robustseg.evaluation.shard import log_path, merge_shards, parse_shard, read_manifests, shard_cases, write_manifest
from robustseg.evaluation.store import AdversarialStore, atomic_write_bytes, case_slug
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
    """Resolve targets and source; one checkpoint is one model, different checkpoints get distinct labels."""
    specs = [str(t) for t in as_list(cfg.target)]
    if not specs:
        raise ConfigError("target: name at least one model, e.g. --target unet or target=[unet,unetr]")
    which = str(cfg.get("checkpoint", "best"))
    if which not in ("best", "last"):
        raise ConfigError(f"checkpoint={which!r}: expected 'best' or 'last'")
    mode = cfg.get("train_mode")
    mode = None if mode in (None, "") else str(mode)
    by_sha: dict[str, LoadedModel] = {}
    targets: list[LoadedModel] = []
    for spec in specs:
        model = resolve_model(spec, cfg.runs_root, data_names, which, mode)
        if model.checkpoint_sha256 in by_sha:
            log.warning(
                "target %r is the same checkpoint as %r; evaluated once", spec, by_sha[model.checkpoint_sha256].label
            )
            continue
        by_sha[model.checkpoint_sha256] = model
        targets.append(model)
    source = None
    if cfg.get("source"):
        source = resolve_model(str(cfg.source), cfg.runs_root, data_names, which, mode)
        source = by_sha.get(source.checkpoint_sha256, source)  # a target that is also the surrogate: white-box
    unique_labels(targets + ([source] if source is not None and source not in targets else []))
    return targets, source


def model_info(m: LoadedModel) -> str:
    """What the report says about a model: label, architecture, training mode, run directory, checkpoint."""
    text = (
        f"{m.label}: {m.model_name}, trained {m.train_mode or 'unknown'}, run dir {m.run_dir or '-'}, "
        f"checkpoint {m.checkpoint} (sha256 {m.checkpoint_sha256[:12]})"
    )
    return text + (f" [{m.checkpoint_note}]" if m.checkpoint_note else "")


def model_record(m: LoadedModel) -> dict[str, Any]:
    """A model's provenance as data (run file ``models``; ``finalize`` hands it on): label, architecture, run
    directory, checkpoint, sha256, training mode, fallback note, role."""
    return {
        "label": m.label,
        "architecture": m.model_name,
        "run_dir": m.run_dir,
        "checkpoint": m.checkpoint,
        "checkpoint_sha256": m.checkpoint_sha256,
        "train_mode": m.train_mode,
        "checkpoint_note": m.checkpoint_note,
    }


def _settings(cfg: DictConfig, targets, source, suite, n_cases: int, notes: list[str]) -> dict[str, Any]:
    window = cfg.data.get("intensity") or {}
    hu = (float(window["a_max"]) - float(window["a_min"])) if {"a_min", "a_max"} <= set(window) else None

    def budget(spec) -> str:
        if spec.eps is None:
            return f"{spec.label} {spec.budget}"
        text = f"{spec.label} {spec.budget} = {spec.eps:.5f}"
        return text + (f" (~{spec.eps * hu:.1f} HU)" if hu and cfg.data.get("modality") == "ct" else "")

    models = targets + ([source] if source is not None and source not in targets else [])
    out = {
        "data": f"{cfg.data.name} ({cfg.get('split', 'validation')}, {n_cases} case(s))",
        "targets": ", ".join(
            f"{t.label} [{t.model_name}, {t.train_mode or '?'}, {Path(t.checkpoint).name} {t.checkpoint_sha256[:12]}]"
            for t in targets
        ),
        "models": "; ".join(model_info(m) for m in models),
        "threat model": (f"transfer from {source.label}" + (" + white-box" if cfg.get("also_whitebox") else ""))
        if source
        else "white-box (each target is its own source)",
        "attacks": "; ".join(budget(s) for s in suite),
        "attack_mode": f"{cfg.attack_mode} (pipeline: through the scoring sliding window; tiles: papers' protocol)",
        "sliding window": {**OmegaConf.to_container(cfg.sw, resolve=True), "sigma_scale": SlidingWindow().sigma_scale},
        "scored region": "each case's real voxels (padding added by the transforms is cropped off before scoring "
        "and attacking)",
        "NSD tolerance (mm)": cfg.metrics.get("nsd_tolerance_mm") or "the largest voxel spacing of each case",
        "frequency bands (normalised DCT radius)": OmegaConf.to_container(cfg.frequency.bands, resolve=True)
        if cfg.get("frequency") and cfg.frequency.get("bands")
        else "off",
        "seed": cfg.seed,
        "shard": cfg.shard,
    }
    units = model_units(models, suite)
    if units:
        out["budgets in the models' own input units"] = units
    notes = [*notes, *(f"{m.label}: {m.checkpoint_note}" for m in models if m.checkpoint_note)]
    if notes:
        out["model notes"] = notes
    return out


def model_units(models: list[LoadedModel], suite) -> list[str]:
    """Each eps budget in the input units of every adapted model (``extra["input_units"]``, e.g. nnU-Net z-units)."""
    from robustseg.external import budget_in_units

    out = []
    for m in models:
        units = (m.extra or {}).get("input_units")
        for spec in suite if units else []:
            text = budget_in_units(units, spec.eps) if spec.eps is not None else None
            if text:
                out.append(f"{m.label}: {spec.label} {spec.budget} = {text}")
    return out


def _window(cfg: DictConfig) -> SlidingWindow:
    return SlidingWindow(
        overlap=float(cfg.sw.overlap),
        sw_batch_size=int(cfg.sw.sw_batch_size),
        blend_mode=str(cfg.sw.blend_mode),
        roi_size=tuple(cfg.sw.roi_size) if cfg.sw.get("roi_size") else None,
    )


def evaluate(cfg: DictConfig) -> Path:
    """Run (this shard of) the evaluation that ``cfg`` describes and return its output directory.

    Nothing is written before the settings, the models and the output location are checked; the output
    directory (and shard) is then locked against a second evaluation (``lock: fail | wait``).

    Raises:
        ConfigError, CheckpointError, DataError: bad settings, unusable checkpoints or data (named).
        OutputLockedError: another live evaluation writes the same output directory and shard.
    """
    validate.settings(cfg)
    out = output_dir(cfg)
    index, count = parse_shard(str(cfg.shard))
    validate.output_location(out)
    if cfg.get("merge"):
        if not out.is_dir():
            raise ConfigError(f"merge=true: output_dir {out} does not exist; run the shards first")
        with OutputLock(out / ".lock.merge", str(cfg.get("lock", "fail"))):
            busy = {i: held(lock_file(out, i, count)) for i in range(count)}
            busy = {i: o for i, o in busy.items() if o}
            if busy:
                raise ConfigError(
                    f"merge: shard(s) {sorted(busy)} of {count} are still running ({busy}); wait for them"
                )
            return finalize(cfg, out, count)
    torch.manual_seed(int(cfg.seed))
    suite = build_suite(  # first: a bad attack name fails before any data or checkpoint is read
        [str(a) for a in as_list(cfg.attacks)],
        as_list(cfg.eps),
        as_list(cfg.get("q_max")),
        _conf_dir(),
        OmegaConf.to_container(cfg.attack_overrides, resolve=True) if cfg.get("attack_overrides") else {},
        suites=[OmegaConf.to_container(cfg.suite, resolve=True)] if cfg.get("suite") else [],
        cascade=bool(cfg.get("cascade", False)),
        allow_large_eps=bool(cfg.get("allow_large_eps", False)),
    )
    # models next: a bad or unsafe checkpoint fails before any data is prepared or read
    targets, source = _models(cfg, [str(cfg.data.name)])
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    models = targets + ([source] if source is not None and source not in targets else [])
    check_compatible(models, int(cfg.data.num_classes), cfg.data.get("class_names"), data_cfg.get("intensity"))
    notes = check_preprocessing(models, data_cfg, bool(cfg.get("allow_preprocessing_mismatch", False)))
    notes = [f"allow_preprocessing_mismatch=true: {n}" for n in notes]

    from robustseg.data import build_datamodule

    datamodule = build_datamodule(cfg.data)
    split = str(cfg.get("split", "validation"))
    cases = datamodule.validate().get(split)
    if not cases:
        raise ConfigError(f"split={split!r}: the dataset {cfg.data.name} has no such split or it is empty")
    case_ids = sorted(str(c["case_id"]) for c in cases)
    limit = validate.max_cases(cfg.get("max_cases"))
    if limit is not None:
        case_ids = case_ids[:limit]
    mine = shard_cases(case_ids, index, count)

    validate.make_output_dir(out)  # everything is checked: from here on the output directory is ours
    with OutputLock(lock_file(out, index, count), str(cfg.get("lock", "fail"))):
        return _run_shard(cfg, out, index, count, suite, datamodule, cases, mine, targets, source, notes)


def lock_file(out: Path, index: int, count: int) -> Path:
    """The lock of one shard of an output directory."""
    return out / f".lock.shard-{index}-of-{count}"


def _run_shard(cfg, out, index, count, suite, datamodule, cases, mine, targets, source, notes) -> Path:
    montage_cases = set(mine[: int(cfg.get("montage_cases", 1))])
    last_budget = {s.label: s.budget for s in suite}  # one montage per attack: its largest (last) budget

    def montage(src, tgt, spec, case_id, *volumes, settings_id: str = "") -> str | None:
        """One figure per (source, target, attack) of the first cases, at the attack's largest budget; the name
        carries the result's identity, so figures of other settings never overwrite or stand in for it."""
        if case_id in montage_cases and spec.budget == last_budget[spec.label]:
            name = f"{case_slug(case_id)}_{src.label}_to_{tgt.label}_{spec.label}@{spec.budget}_{settings_id[:8]}.png"
            title = f"{spec.label}@{spec.budget} from {src.label} on {tgt.label}, case {case_id}"
            name = re.sub(r"[^A-Za-z0-9_.@-]+", "_", name)
            save_montage(out / "montages" / name, *volumes, title=title)
            return f"montages/{name}"
        return None

    bands = cfg.get("frequency", {}).get("bands") if cfg.get("frequency") else None
    evaluator = Evaluator(
        targets,
        source,
        suite,
        AdversarialStore(out / "adversarial"),
        CaseLog(log_path(out, index, count)),
        window=_window(cfg),
        mode=str(cfg.attack_mode),
        memory_bounded=bool(cfg.memory_bounded),
        seed=int(cfg.seed),
        nsd_tolerance_mm=None if cfg.metrics.get("nsd_tolerance_mm") is None else float(cfg.metrics.nsd_tolerance_mm),
        bands=OmegaConf.to_container(bands, resolve=True) if bands else None,
        max_zero_grad_fraction=float(cfg.checks.max_zero_grad_fraction),
        montage=montage,
        also_whitebox=bool(cfg.get("also_whitebox", False)),
        data=data_preprocessing(OmegaConf.to_container(cfg.data, resolve=True)),
        progress=None,
        skip=cascade_predicate if cfg.get("cascade") else None,
    )
    keys = [k for c in mine for k in evaluator.keys(c)]
    write_manifest(out, index, count, mine, keys)  # the partition; completed with identities at the end
    dataset = datamodule.eval_dataset(str(cfg.get("split", "validation")))
    position = {str(c["case_id"]): i for i, c in enumerate(cases)}
    stats = evaluator.run((dataset[position[c]] for c in mine), total=len(mine))
    run_id = evaluator.run_identity()
    run_sha = short_hash(run_id)
    run_file = out / f"run.shard-{index}-of-{count}.json"
    previous = json.loads(run_file.read_text()) if run_file.exists() else {}
    if evaluator.checked:
        flags = [f.to_dict() for f in evaluator.flags]
    elif previous.get("identity_sha256") == run_sha:
        flags = previous["flags"]  # nothing was computed: the flags measured with these settings stay valid
    else:
        log.info("all results exist but no flags for these settings: running the checks on case %s", mine[0])
        from robustseg.evaluation.region import real_case

        image, label, *_ = real_case(dataset[position[mine[0]]])
        evaluator.run_checks(image, label)
        flags = [f.to_dict() for f in evaluator.flags]
    overhead = {f"check {k}": v for k, v in stats.overhead_passes.items()}
    append_cost(out, index, count, run_sha, stats.seconds, stats.records_written, stats.records_skipped, overhead)
    payload = {
        "identity_sha256": run_sha,
        "identity": run_id,
        "flags": flags,
        "settings": _settings(cfg, targets, source, suite, len(mine), notes),
        "models": [
            model_record(m) for m in targets + ([source] if source is not None and source not in targets else [])
        ],
        "data_warnings": {c: w for c in mine if (w := datamodule.case_warnings(c))},  # suspicious cases
        "this invocation": {
            "records written": stats.records_written,
            "records skipped (already done)": stats.records_skipped,
            "attack generations": stats.generations,
            "seconds": round(stats.seconds, 1),
        },
    }
    atomic_write_bytes(run_file, json.dumps(payload, indent=1, default=str).encode())
    write_manifest(out, index, count, mine, keys, settings_ids=[evaluator.expected[k] for k in keys], identity=run_id)
    log.info("shard %d/%d: %s", index, count, payload["this invocation"])
    if count == 1:
        return finalize(cfg, out, count)
    log.info("shard %d/%d done; combine with: python evaluate.py ... shard=0/%d merge=true", index, count, count)
    return out


def finalize(cfg: DictConfig, out: Path, count: int) -> Path:
    """Summary, flags, report and W&B of exactly this run's results (keys and identities) in ``out``.

    Older records in the folder (other budgets, other settings) stay on disk and never mix in; shards run with
    different settings are refused, naming the settings that differ.
    """
    records = merge_shards(out, count)
    manifests = read_manifests(out, count)
    run_sha = short_hash(manifests[0]["identity"])
    runs = [json.loads(p.read_text()) for p in sorted(out.glob(f"run.shard-*-of-{count}.json"))]
    runs = [r for r in runs if r.get("identity_sha256") == run_sha]
    class_names = list(cfg.data.get("class_names") or []) or None
    context = {
        "intensity": OmegaConf.to_container(cfg.data.intensity, resolve=True) if cfg.data.get("intensity") else None,
        "modality": cfg.data.get("modality"),
        "seed": int(cfg.seed),
    }
    rows = summarise(records, class_names, context)
    flags = checks.result_flags(
        rows,
        records,
        [checks.Flag(**f) for run in runs for f in run["flags"]],
        noise_attacks=[str(a) for a in as_list(cfg.checks.noise_attacks)],
        monotonic_tolerance=float(cfg.checks.monotonic_tolerance),
        store_root=out / "adversarial",
    )
    stats = total_costs(records, read_costs(out, count, run_sha))
    settings = dict(runs[0]["settings"]) if runs else {}
    models = list(runs[0].get("models", [])) if runs else []  # model_record() of every model of this run
    settings["shards"] = count
    settings["data"] = (
        f"{cfg.data.name} ({cfg.get('split', 'validation')}, {len({r['case_id'] for r in records})} case(s))"
    )
    warnings = {c: w for run in runs for c, w in run.get("data_warnings", {}).items()}
    settings["data warnings"] = (
        "; ".join(f"{c}: {' / '.join(w)}" for c, w in sorted(warnings.items())) if warnings else "none"
    )
    settings["result identity"] = f"{run_sha} (records selected by key and identity; other records in {out} ignored)"
    flag_dicts = [f.to_dict() for f in flags]
    set_aside_stale_montages(out, records)
    paths = write_outputs(out, rows, flag_dicts, settings, stats, class_names)
    from robustseg.cards import write_cards  # robustness cards (issue 13): <out>/cards/<target>.json

    write_cards(out, rows, models, flag_dicts, stats, settings, records, class_names)
    config = OmegaConf.to_container(cfg, resolve=True)
    log_wandb(
        config.get("logger"), out, rows, flag_dicts, stats, [p for p in paths.values() if p.suffix == ".png"], config
    )
    raised = [f for f in flags if f.raised]
    for f in raised:
        log.warning("sanity flag raised: %s: %s", f.name, f.detail)
    log.info("report: %s (%d flag(s) raised)", paths["report"], len(raised))
    return out


def set_aside_stale_montages(out: Path, records: list[dict[str, Any]]) -> None:
    """Move figures of other runs' results from ``montages/`` to ``montages/other-results/``.

    The report shows the figures in ``montages/``; only the ones this run's records name stay there.
    """
    mine = {Path(r["montage"]).name for r in records if r.get("montage")}
    folder = out / "montages"
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        if path.name not in mine:
            aside = folder / "other-results"
            aside.mkdir(exist_ok=True)
            path.replace(aside / path.name)
