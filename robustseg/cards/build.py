"""Build robustness cards (``robustseg-card/1``) from an evaluation: its summary rows, models, flags and costs.

One card per target model: :func:`build_card` assembles it, :func:`write_cards` writes
``<out_dir>/cards/<target label>.json`` for every target and validates each before writing. Threat models are
read from the summary rows: every (kind, source, budget) a target was attacked under is one threat model, its
attacks are the rows of that budget, and its worst case is the evaluation's per-case worst row (AutoAttack's
point-wise rule) when two or more attacks ran at that budget.
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

CLEAN = "clean"
WORST = "worst"
RELIABLE_GROUP = "reliable"
REPORTS = {"report": "report.md", "summary": "summary.json", "summary_csv": "summary.csv"}
_COUNT = re.compile(r"([^,:]+):\s*(\d+)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("robustseg")
    except PackageNotFoundError:
        return "unknown"


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_") or "class"


def metrics_of(row: Mapping[str, Any], class_names: Sequence[str] | None) -> dict[str, Any]:
    """Card metrics from a summary row (old rows: ``dice_per_class`` list; new rows: ``dice_<class>`` columns)."""
    per_class = None
    if class_names:
        listed = row.get("dice_per_class")
        if isinstance(listed, (list, tuple)) and len(listed) == len(class_names):
            per_class = {n: float(v) for n, v in zip(class_names, listed)}
        elif all(row.get(f"dice_{_slug(n)}") is not None for n in class_names):
            per_class = {n: float(row[f"dice_{_slug(n)}"]) for n in class_names}
    return {
        "dice": min(1.0, max(0.0, float(row["dice_mean"]))),
        "hd95": _float(row.get("hd95_mean")),
        "nsd": _float(row.get("nsd_mean")),
        "dice_with_bg": _float(row.get("dice_mean_bg")),
        "dice_per_class": per_class,
        "n_cases": int(row.get("n_cases") or 0),
    }


def norm_of(row: Mapping[str, Any]) -> str:
    """The norm of a row's budget: ``linf``/``l2`` for eps attacks, ``noise`` (sigma), ``frequency`` (VAFA's q_max)."""
    if row.get("norm"):
        return str(row["norm"])
    name = str(row.get("attack_name") or row.get("attack", ""))
    budget = str(row.get("budget", ""))
    if "attack.sigma" in row or name == "gn":
        return "noise"
    if "attack.q_max" in row or budget.startswith("q_max") or name.startswith("vafa"):
        return "frequency"
    if row.get("eps") is not None:
        return "l2" if "l2" in name else "linf"
    return _preset_norm(str(row.get("attack", "")))


def _preset_norm(preset: str) -> str:
    """Norm of a ``conf/attack`` preset read from its fields (rows of older evaluations carry only the name)."""
    from robustseg.config import CONF_DIR

    path = CONF_DIR / "attack" / f"{preset}.yaml"
    if not path.is_file():
        return "unknown"
    fields = OmegaConf.load(path)
    if "eps" in fields:
        return "l2" if "l2" in str(fields.get("name", preset)) else "linf"
    return "noise" if "sigma" in fields else "frequency" if "q_max" in fields else "unknown"


def _kind(row: Mapping[str, Any]) -> str:
    return "white-box" if row["source"] == row["target"] else "transfer"


def _counts(text: Any) -> dict[str, int]:
    """``"pgd@8/255: 2, fgsm@8/255: 1"`` -> ``{"pgd": 2, "fgsm": 1}`` (the budget is the threat model's)."""
    out: dict[str, int] = {}
    for name, count in _COUNT.findall(str(text or "")):
        attack = name.strip().rsplit("@", 1)[0]
        out[attack] = out.get(attack, 0) + int(count)
    return out


def threat_models(
    rows: Sequence[Mapping[str, Any]], target: str, class_names: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Every threat model ``target`` was evaluated under, from the summary rows (see the module docstring)."""
    mine = [r for r in rows if r["target"] == target and r["attack"] != CLEAN and str(r["budget"]) != "all"]
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in mine:
        groups.setdefault((_kind(r), str(r["source"]), str(r["budget"])), []).append(r)
    out = []
    for (kind, source, budget), group in groups.items():
        attacks = [r for r in group if not str(r["attack"]).startswith(WORST)]
        if not attacks:
            continue
        worst_row = next((r for r in group if r["attack"] == WORST), None)
        norm = norm_of(attacks[0])
        results = [{"attack": str(r["attack"]), "metrics": metrics_of(r, class_names)} for r in attacks]
        if worst_row is not None:
            counts = _counts(worst_row.get("worst_dice_attacks") or worst_row.get("worst_attacks"))
            reliable = any(str(r.get("group") or "") == RELIABLE_GROUP for r in attacks)
            worst = {
                "metrics": metrics_of(worst_row, class_names),
                "attacks": counts,
                "suite": "reliable" if reliable else "standard",
            }
            robust = worst["metrics"]["dice"]
            worst_attack = max(counts, key=lambda a: (counts[a], a)) if counts else "?"
        else:
            worst = None
            weakest = min(results, key=lambda a: a["metrics"]["dice"])
            robust, worst_attack = weakest["metrics"]["dice"], weakest["attack"]
        prefix = "white-box" if kind == "white-box" else f"transfer from {source}"
        out.append(
            {
                "id": f"{prefix} {norm} {budget}",
                "kind": kind,
                "source": None if kind == "white-box" else source,
                "norm": norm,
                "budget": budget,
                "eps": _float(attacks[0].get("eps")),
                "attacks": results,
                "worst": worst,
                "robust_dice": robust,
                "worst_attack": worst_attack,
            }
        )
    return sorted(out, key=lambda t: (t["kind"] != "white-box", t["source"] or "", t["norm"], t["eps"] or 0.0))


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
        "lr": _float(system.get("lr")),
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


def run_config(model: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the training config, its path) of a loaded model: ``<run>/config.yaml``, else the checkpoint's hparams."""
    run_dir = (getattr(model, "extra", None) or {}).get("run_dir")
    if run_dir and (Path(run_dir) / "config.yaml").is_file():
        path = Path(run_dir) / "config.yaml"
        try:
            return OmegaConf.to_container(OmegaConf.load(path), resolve=True), str(path)  # type: ignore[return-value]
        except Exception:  # an interpolation that cannot resolve here: keep the literal values
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False), str(path)  # type: ignore[return-value]
    config = (getattr(model, "extra", None) or {}).get("config")
    return (dict(config), None) if config else (None, None)


def flags_for(flags: Sequence[Mapping[str, Any]], label: str, labels: Sequence[str]) -> list[dict[str, Any]]:
    """The evaluation's flags that concern ``label``: those naming it, and those naming no model (run-wide)."""
    out = []
    for f in flags:
        detail = str(f.get("detail", ""))
        named = [m for m in labels if m in detail]
        if label in named or not named:
            out.append({"name": str(f["name"]), "raised": bool(f["raised"]), "detail": detail})
    return out


def cost_of(costs: Mapping[str, Any]) -> dict[str, Any]:
    """The run's network passes (all targets together: ``scope: run``)."""

    def count(*keys: str) -> int | None:
        return next((int(costs[k]) for k in keys if costs.get(k) is not None), None)

    return {
        "scope": "run",
        "attack_forwards": count("attack forwards"),
        "attack_backwards": count("attack backwards"),
        "score_forwards": count("scoring forwards"),
        "seconds": _float(costs.get("seconds")),
    }


def build_card(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    flags: Sequence[Mapping[str, Any]],
    costs: Mapping[str, Any],
    dataset: Mapping[str, Any],
    labels: Sequence[str],
    reports: Mapping[str, str] | None = None,
) -> Card:
    """The card of one target.

    Args:
        model: a :class:`~robustseg.evaluation.resolve.LoadedModel` (label, model_name, checkpoint, sha256, net).
        rows: the evaluation's summary rows (all targets; this model's are picked by label).
        flags: the evaluation's sanity flags as dicts (``name``, ``raised``, ``detail``).
        costs: the evaluation's stats (``attack forwards``, ``attack backwards``, ``scoring forwards``, ``seconds``).
        dataset: ``name``, ``split`` of the evaluated data.
        labels: every model label of the evaluation (to tell which flags concern this model).
        reports: report name -> path relative to the card.

    Raises:
        CardError: the assembled card does not validate (a bug or a row without Dice), naming the field.
    """
    label = model.label
    clean = next((r for r in rows if r["target"] == label and r["attack"] == CLEAN), None)
    if clean is None:
        raise ValueError(f"no clean row for target {label!r} in the summary: cannot write its card")
    class_names = list(model.class_names) if getattr(model, "class_names", None) else None
    config, config_path = run_config(model)
    own_flags = flags_for(flags, label, labels)
    raised = [f for f in own_flags if f["raised"]]
    choices = (config or {}).get("choices") or {}
    net = getattr(model, "net", None)
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
            "architecture": str(model.model_name),
            "preset": choices.get("model"),
            "parameters": sum(p.numel() for p in net.parameters()) if hasattr(net, "parameters") else None,
            "checkpoint": str(model.checkpoint),
            "checkpoint_sha256": str(model.checkpoint_sha256),
        },
        "training": training_of(config, config_path),
        "preprocessing": preprocessing_of(config, model.roi_size),
        "clean": metrics_of(clean, class_names),
        "threat_models": threat_models(rows, label, class_names),
        "cost": cost_of(costs),
        "flags": own_flags,
        "unreliable": bool(raised),
        "unreliable_reason": "; ".join(f"{f['name']}: {f['detail']}" for f in raised) or None,
        "reports": dict(reports or {}),
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
) -> list[Path]:
    """Write ``<out_dir>/cards/<label>.json`` for every target model with a clean row; returns the paths.

    Args:
        out_dir: the evaluation's output directory (the cards link to its report.md and summary files).
        rows, flags, costs: the evaluation's summary rows, sanity flags (dicts) and stats.
        models: the target models (:class:`~robustseg.evaluation.resolve.LoadedModel`); sources that are not
            targets get no card.
        settings: the evaluation's settings; ``data`` (``"<name> (<split>, ...)"``) or ``dataset``/``split``
            name the evaluated data.
    """
    out_dir = Path(out_dir)
    dataset = dataset_of(settings)
    labels = [m.label for m in models]
    reports = {k: f"../{v}" for k, v in REPORTS.items() if (out_dir / v).exists()}
    paths = []
    for model in models:
        if not any(r["target"] == model.label and r["attack"] == CLEAN for r in rows):
            continue
        card = build_card(model, rows, flags, costs, dataset, labels, reports)
        path = out_dir / "cards" / card_filename(model.label)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(card.model_dump_json(indent=1) + "\n")
        tmp.replace(path)
        paths.append(path)
    return paths


def dataset_of(settings: Mapping[str, Any]) -> dict[str, str]:
    """``{name, split}`` of the evaluated data from the evaluation's settings."""
    if settings.get("dataset"):
        return {"name": str(settings["dataset"]), "split": str(settings.get("split", "validation"))}
    text = str(settings.get("data", ""))
    match = re.match(r"\s*([^\s(]+)\s*(?:\(([^,)]+))?", text)
    if not match:
        raise ValueError(f"settings.data={text!r}: cannot tell the evaluated dataset for the cards")
    return {"name": match[1], "split": (match[2] or "validation").strip()}
