"""Build robustness cards (``robustseg-card/1``) from an evaluation: its summary rows, models, flags and costs.

One card per target model: :func:`build_card` assembles it, :func:`write_cards` writes
``<out_dir>/cards/<target label>.json`` for every target and validates each before writing. The threat models
come from the summary rows (:mod:`robustseg.cards.threats`); training mode, training data and preprocessing from
the model's run ``config.yaml``; flags concern a model when they name it or name no model.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from robustseg.cards.schema import FORMAT, Card, validate_card
from robustseg.cards.threats import CLEAN, as_float, metrics_of, threat_models

REPORTS = {"report": "report.md", "summary": "summary.json", "summary_csv": "summary.csv"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("robustseg")
    except PackageNotFoundError:
        return "unknown"


def training_of(config: Mapping[str, Any] | None, config_path: str | None) -> dict[str, Any]:
    """The card's ``training`` section from a run's config (``unknown`` mode when there is none)."""
    if not config:
        keys = ("attack", "adv_mode", "data", "epochs", "lr")
        return {"mode": "unknown", **dict.fromkeys(keys), "config": config_path}
    attack = config.get("attack") or None
    system = config.get("system") or {}
    adv_mode = system.get("adv_mode") if attack else None
    mode = "clean" if not attack else "vaft" if adv_mode == "vaft" else "attack"
    data = config.get("data") or {}
    epochs = (config.get("trainer") or {}).get("max_epochs")
    return {
        "mode": mode,
        "attack": dict(attack) if attack else None,
        "adv_mode": adv_mode,
        "data": data.get("name") or (config.get("choices") or {}).get("data"),
        "epochs": int(epochs) if epochs is not None else None,
        "lr": as_float(system.get("lr")),
        "config": config_path,
    }


def preprocessing_of(config: Mapping[str, Any] | None, roi_size: Sequence[int]) -> dict[str, Any]:
    """What the model expects of its input, from the data section of its training config."""
    data = (config or {}).get("data") or {}
    intensity = data.get("intensity")
    spacing = data.get("spacing")
    return {
        "modality": data.get("modality"),
        "intensity": {k: float(v) for k, v in intensity.items()} if intensity else None,
        "orientation": data.get("orientation"),
        "spacing": [float(s) for s in spacing] if isinstance(spacing, (list, tuple)) else None,
        "roi_size": [int(s) for s in roi_size],
    }


def _get(model: Any, *names: str) -> Any:
    """A model's field by the first name it has: a LoadedModel attribute or a key of the report's model dict."""
    for name in names:
        value = model.get(name) if isinstance(model, Mapping) else getattr(model, name, None)
        if value is not None:
            return value
    return None


def run_config(model: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the training config, its path) of a model: ``<run>/config.yaml``, else the config it carries."""
    run_dir = _get(model, "run_dir") or (_get(model, "extra") or {}).get("run_dir")
    if run_dir and (Path(run_dir) / "config.yaml").is_file():
        path = Path(run_dir) / "config.yaml"
        try:
            return OmegaConf.to_container(OmegaConf.load(path), resolve=True), str(path)  # type: ignore[return-value]
        except Exception:  # an interpolation that cannot resolve here: keep the literal values
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False), str(path)  # type: ignore[return-value]
    config = (_get(model, "extra") or {}).get("config")
    return (dict(config), None) if config else (None, None)


def checkpoint_facts(model: Any) -> dict[str, int | None]:
    """``parameters`` (counted on a loaded net, else on the checkpoint's ``net.`` weights) and ``epochs`` actually
    trained (the Lightning checkpoint's ``epoch`` + 1; None when the checkpoint does not say)."""
    facts: dict[str, int | None] = {"parameters": None, "epochs": None}
    net = _get(model, "net")
    if hasattr(net, "parameters"):
        facts["parameters"] = sum(p.numel() for p in net.parameters())
    path = _get(model, "checkpoint")
    if not path or not Path(path).is_file() or Path(path).suffix != ".ckpt":
        return facts
    from robustseg.checkpoint_io import safe_torch_load

    try:
        ckpt = safe_torch_load(path, what="checkpoint")
    except Exception:  # a checkpoint torch cannot read safely: both facts are optional
        return facts
    if facts["parameters"] is None:
        state = ckpt.get("state_dict", {})
        facts["parameters"] = sum(v.numel() for k, v in state.items() if k.startswith("net.")) or None
    if isinstance(ckpt.get("epoch"), int):
        facts["epochs"] = ckpt["epoch"] + 1
    return facts


def flags_for(flags: Sequence[Mapping[str, Any]], label: str, labels: Sequence[str]) -> list[dict[str, Any]]:
    """The evaluation's flags that concern ``label``: those naming it, and those naming no model (run-wide)."""
    out = []
    for f in flags:
        detail = str(f.get("detail", ""))
        named = [m for m in labels if m in detail]
        if label in named or not named:
            out.append({"name": str(f["name"]), "raised": bool(f["raised"]), "detail": detail})
    return out


def cost_of(costs: Mapping[str, Any], records: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Network passes: this target's (``scope: target``, summed over its records' ``cost``) when records are given,
    else the whole evaluation's (``scope: run``). A transfer volume's crafting counts with the first target scored
    on it (the records' convention)."""
    if records:
        parts = [r.get("cost") or {} for r in records]
        return {
            "scope": "target",
            "attack_forwards": sum(int(c.get("attack_forwards", 0)) for c in parts),
            "attack_backwards": sum(int(c.get("attack_backwards", 0)) for c in parts),
            "score_forwards": sum(int(c.get("score_forwards", 0)) for c in parts),
            "seconds": round(sum(float(c.get("seconds", 0.0)) for c in parts), 3),
        }

    def count(*keys: str) -> int | None:
        return next((int(costs[k]) for k in keys if costs.get(k) is not None), None)

    seconds = next((costs[k] for k in ("seconds producing the results", "seconds") if costs.get(k) is not None), None)
    return {
        "scope": "run",
        "attack_forwards": count("attack forwards"),
        "attack_backwards": count("attack backwards"),
        "score_forwards": count("scoring forwards"),
        "seconds": as_float(seconds),
    }


def build_card(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    costs: Mapping[str, Any],
    dataset: Mapping[str, Any],
    labels: Sequence[str],
    reports: Mapping[str, str] | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> Card:
    """The card of one target.

    Args:
        model: a :class:`~robustseg.evaluation.resolve.LoadedModel`, or the report's model dict (``label``,
            ``architecture``, ``run_dir``, ``checkpoint``, ``checkpoint_sha256``).
        rows: the evaluation's summary rows (all targets; this model's are picked by label).
        flags: the evaluation's sanity flags as dicts (``name``, ``raised``, ``detail``).
        costs: the evaluation's cost totals (``attack forwards``, ``attack backwards``, ``scoring forwards``, ...).
        dataset: ``name``, ``split`` and optionally ``class_names`` of the evaluated data.
        labels: every model label of the evaluation (to tell which flags concern this model).
        reports: report name -> path relative to the card.
        records: the evaluation's per-case records (optional): per-target and per-threat-model passes.
        evaluation: the evaluation settings worth repeating on the card (sliding window, attack_mode, seed, ...).

    Raises:
        CardError: the assembled card does not validate (a bug or a row without Dice), naming the field.
    """
    label = str(_get(model, "label"))
    clean = next((r for r in rows if r["target"] == label and r["attack"] == CLEAN), None)
    if clean is None:
        raise ValueError(f"no clean row for target {label!r} in the summary: cannot write its card")
    config, config_path = run_config(model)
    names = (
        _get(model, "class_names")
        or dataset.get("class_names")
        or ((config or {}).get("data") or {}).get("class_names")
    )
    class_names = [str(n) for n in names] if names else None
    own_records = [r for r in records or () if r.get("target") == label and r.get("attack") != CLEAN]
    own_flags = flags_for(flags, label, labels)
    raised = [f for f in own_flags if f["raised"]]
    choices = (config or {}).get("choices") or {}
    facts = checkpoint_facts(model)
    training = training_of(config, config_path)
    roi = _get(model, "roi_size") or ((config or {}).get("data") or {}).get("roi_size") or []
    card = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "robustseg_version": _version(),
        "dataset": {
            "name": str(dataset["name"]),
            "split": str(dataset.get("split", "validation")),
            "n_cases": int(clean.get("n_cases") or 0),
            "class_names": class_names,
        },
        "model": {
            "label": label,
            "architecture": str(_get(model, "model_name", "architecture")),
            "preset": choices.get("model"),
            "parameters": facts["parameters"],
            "checkpoint": str(_get(model, "checkpoint")),
            "checkpoint_sha256": str(_get(model, "checkpoint_sha256")),
        },
        "training": {**training, "epochs": facts["epochs"] or training["epochs"]},
        "preprocessing": preprocessing_of(config, roi),
        "clean": metrics_of(clean, class_names),
        # a threat model's crafting passes: every record of its (source, budget), whichever target the records'
        # convention charged a shared transfer volume to
        "threat_models": threat_models(rows, label, class_names, [r for r in records or () if r.get("source")]),
        "cost": cost_of(costs, own_records if own_records and all("cost" in r for r in own_records) else None),
        "flags": own_flags,
        "unreliable": bool(raised),
        "unreliable_reason": "; ".join(f"{f['name']}: {f['detail']}" for f in raised) or None,
        "reports": dict(reports or {}),
        "evaluation": dict(evaluation or {}),
    }
    return validate_card(json.loads(json.dumps(card, default=str)), f"card of {label}")


def card_filename(label: str) -> str:
    """A file name for a model label (path separators and odd characters replaced)."""
    return re.sub(r"[^A-Za-z0-9_.@+-]+", "_", label) + ".json"


def write_cards(
    out_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    models: Sequence[Any],
    flags: Sequence[Mapping[str, Any]],
    costs: Mapping[str, Any],
    settings: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``<out_dir>/cards/<label>.json`` for every target model (a model with a clean row); returns the paths.

    Args:
        out_dir: the evaluation's output directory (the cards link to its report.md and summary files).
        rows, flags, costs: the evaluation's summary rows, sanity flags (dicts) and cost totals.
        models: every model of the evaluation (LoadedModel objects or the report's model dicts); a surrogate that
            is not a target gets no card.
        settings: the evaluation's settings; ``data`` (``"<name> (<split>, ...)"``) names the evaluated data.
        records: the per-case records (optional; per-target and per-threat-model costs).
        class_names: the evaluated data's class names (background first), when the models do not carry them.
    """
    out_dir = Path(out_dir)
    dataset = {**dataset_of(settings), "class_names": list(class_names) if class_names else None}
    labels = [str(_get(m, "label")) for m in models]
    reports = {k: f"../{v}" for k, v in REPORTS.items() if (out_dir / v).exists()}
    paths = []
    for model, label in zip(models, labels):
        if not any(r["target"] == label and r["attack"] == CLEAN for r in rows):
            continue
        card = build_card(model, rows, flags, costs, dataset, labels, reports, records, evaluation_of(settings))
        path = out_dir / "cards" / card_filename(label)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(card.model_dump_json(indent=1) + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths


EVALUATION_KEYS = ("attack_mode", "sliding window", "NSD tolerance (mm)", "seed", "threat model", "attacks")


def evaluation_of(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation settings a card repeats (what a reader needs to reproduce its numbers)."""
    return {k: settings[k] for k in EVALUATION_KEYS if k in settings}


def dataset_of(settings: Mapping[str, Any]) -> dict[str, str]:
    """``{name, split}`` of the evaluated data from the evaluation's settings."""
    if settings.get("dataset"):
        return {"name": str(settings["dataset"]), "split": str(settings.get("split", "validation"))}
    text = str(settings.get("data", ""))
    match = re.match(r"\s*([^\s(]+)\s*(?:\(([^,)]+))?", text)
    if not match:
        raise ValueError(f"settings.data={text!r}: cannot tell the evaluated dataset for the cards")
    return {"name": match[1], "split": (match[2] or "validation").strip()}
