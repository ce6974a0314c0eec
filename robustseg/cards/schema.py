"""The robustness card format ``robustseg-card/1``: one JSON document per (evaluation, target model).

Modelled on RobustBench's model cards (Croce et al., NeurIPS 2021 Datasets and Benchmarks): a card says what
the model is (architecture, checkpoint hash, how and on what it was trained, the preprocessing it expects), how
it was attacked (threat models with their budgets, the attacks, the cost in network passes) and what came out
(clean Dice / HD95 / NSD, robust Dice per attack and under the worst case), plus the evaluation's sanity flags
and ``unreliable: true`` with the reason when a flag says the numbers cannot be trusted. Leaderboards are
generated from cards only (:mod:`robustseg.leaderboard`).

The format is versioned by its ``format`` field. :func:`validate_card` refuses a card of another (older) format,
a missing field and a field of the wrong type, naming the field; the pydantic models below are the single
definition (``Card.model_json_schema()`` is the JSON Schema; docs/cards.md describes every field).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from robustseg.errors import RobustsegError

FORMAT = "robustseg-card/1"
FORMAT_PREFIX = "robustseg-card/"
THREAT_KINDS = ("white-box", "transfer")


class CardError(RobustsegError, ValueError):
    """A card is of another format, lacks a field or has a field of the wrong type; the message names it."""


class _Strict(BaseModel):
    """Unknown keys are refused (a misspelt field is an error, not silently dropped); types are not coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Metrics(_Strict):
    """Segmentation quality of one condition, means over the evaluated cases (foreground classes only).

    ``dice`` in [0, 1]; ``hd95`` in mm (None when not computed); ``nsd`` in [0, 1] at the evaluation's tolerance;
    ``dice_per_class`` maps every class name (background included) to its mean Dice.
    """

    dice: float = Field(ge=0.0, le=1.0)
    hd95: float | None = None
    nsd: float | None = None
    dice_with_bg: float | None = None
    dice_per_class: dict[str, float] | None = None
    n_cases: int = Field(ge=0)


class AttackResult(_Strict):
    """One attack of a threat model: the target's metrics on the volumes it produced."""

    attack: str
    metrics: Metrics


class WorstCase(_Strict):
    """Per case the lowest-Dice attack of the threat model (AutoAttack's point-wise worst case).

    ``suite`` is ``reliable`` when the reliable attack suite (SEA-style APGD ensemble) took part, else
    ``standard``; ``attacks`` counts the cases each attack won, e.g. ``{"pgd": 1}``.
    """

    metrics: Metrics
    attacks: dict[str, int]
    suite: Literal["standard", "reliable"]


class ThreatModel(_Strict):
    """One threat model: who crafts (white-box: the target itself; transfer: a named surrogate), the norm and budget.

    ``id`` is what leaderboard tables are keyed by (with the dataset): e.g. ``white-box linf 8/255`` or
    ``transfer from unet_small-lits117-clean linf 8/255``. ``robust_dice`` is the worst case's Dice, or the
    single attack's when only one ran; ``worst_attack`` names the attack that won most cases.
    """

    id: str
    kind: Literal["white-box", "transfer"]
    source: str | None
    norm: str  # linf | l2 | frequency (VAFA's quantisation budget) | noise | unknown
    budget: str  # "8/255", "q_max=20", "preset"
    eps: float | None
    attacks: list[AttackResult] = Field(min_length=1)
    worst: WorstCase | None
    robust_dice: float = Field(ge=0.0, le=1.0)
    worst_attack: str
    attack_forwards: int | None = None  # passes spent crafting this threat model's volumes (None: not recorded)
    attack_backwards: int | None = None

    @model_validator(mode="after")
    def _source_matches_kind(self) -> ThreatModel:
        if self.kind == "transfer" and not self.source:
            raise ValueError("a transfer threat model needs its source (the surrogate that crafted)")
        return self


class ModelInfo(_Strict):
    """The evaluated network: table label, registered architecture, parameter count and checkpoint identity."""

    label: str
    architecture: str
    preset: str | None
    parameters: int | None
    checkpoint: str
    checkpoint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Training(_Strict):
    """How the model was trained, read from its run's ``config.yaml`` (or the checkpoint's hyper-parameters).

    ``mode``: ``clean``, ``attack`` (adversarial training; ``attack`` holds the preset with its settings and
    ``adv_mode`` the loss mix) or ``vaft``; ``unknown`` for external models without a config.
    """

    mode: Literal["clean", "attack", "vaft", "unknown"]
    attack: dict[str, Any] | None
    adv_mode: str | None
    data: str | None
    epochs: int | None  # epochs actually trained (checkpoint), else the config's max_epochs
    lr: float | None
    config: str | None  # path of the run's config.yaml when one was found


class Preprocessing(_Strict):
    """What the model expects of its input (from its training config): modality, intensity window, geometry."""

    modality: str | None
    intensity: dict[str, float] | None
    orientation: str | None
    spacing: list[float] | None
    roi_size: list[int]


class Dataset(_Strict):
    """The evaluated data: dataset name, split, number of cases and the class names (background first)."""

    name: str
    split: str
    n_cases: int = Field(ge=0)
    class_names: list[str] | None


class Cost(_Strict):
    """Network passes the evaluation spent. ``scope`` is ``run`` when the counts cover the whole evaluation (all
    targets), ``target`` when they are this model's alone; ``attack_*`` craft, ``score_*`` score."""

    scope: Literal["run", "target"]
    attack_forwards: int | None
    attack_backwards: int | None
    score_forwards: int | None
    seconds: float | None


class Flag(_Strict):
    """A sanity flag of the evaluation (robustseg.evaluation.checks); ``raised`` means the check failed."""

    name: str
    raised: bool
    detail: str


class Card(_Strict):
    """A robustness card, format ``robustseg-card/1``."""

    format: Literal["robustseg-card/1"]
    created: str  # ISO 8601 UTC
    robustseg_version: str
    dataset: Dataset
    model: ModelInfo
    training: Training
    preprocessing: Preprocessing
    clean: Metrics
    threat_models: list[ThreatModel]
    cost: Cost
    flags: list[Flag]
    unreliable: bool
    unreliable_reason: str | None
    reports: dict[str, str]  # name -> path relative to the card (report.md, summary.json)
    evaluation: dict[str, Any] = Field(default_factory=dict)  # settings: sliding window, attack_mode, seed, ...

    @model_validator(mode="after")
    def _reason_when_unreliable(self) -> Card:
        if self.unreliable and not self.unreliable_reason:
            raise ValueError("unreliable is true but unreliable_reason is empty: say which flag and why")
        ids = [t.id for t in self.threat_models]
        if len(ids) != len(set(ids)):
            raise ValueError(f"threat_models: duplicate ids {sorted({i for i in ids if ids.count(i) > 1})}")
        return self


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[") or "card"


def validate_card(data: Mapping[str, Any], where: str = "card") -> Card:
    """Check a parsed card against ``robustseg-card/1`` and return it as a :class:`Card`.

    Args:
        data: the card's JSON object.
        where: how messages name the card (usually its path).

    Raises:
        CardError: another or an older format (``format``), or a missing / mistyped / unknown field, naming it.
    """
    if not isinstance(data, Mapping):
        raise CardError(f"{where}: a card is a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt is None:
        raise CardError(f"{where}: field 'format' is missing; expected {FORMAT!r} (regenerate the card)")
    if fmt != FORMAT:
        older = isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX)
        raise CardError(
            f"{where}: field 'format' is {fmt!r}; this robustseg reads {FORMAT!r} only"
            + (" (an older card format: re-run the evaluation to write a current card)" if older else "")
        )
    try:
        return Card.model_validate(dict(data))
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = _location(e["loc"])
            kind = "missing" if e["type"] == "missing" else "unknown" if e["type"] == "extra_forbidden" else None
            if kind:
                problems.append(f"field '{field}' is {kind}")
            else:
                problems.append(f"field '{field}': {e['msg']} (got {e.get('input')!r})")
        raise CardError(f"{where}: not a valid {FORMAT} card: " + "; ".join(problems)) from None


def load_card(path: str | Path) -> Card:
    """Read and validate a card file.

    Raises:
        CardError: unreadable JSON, or any :func:`validate_card` problem, naming the file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CardError(f"{path}: cannot read a card: {err}") from None
    return validate_card(data, str(path))


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``robustseg-card/1`` (generated from :class:`Card`)."""
    return Card.model_json_schema()
