"""Evidence for the reliable suite: robust Dice under the papers' attacks and under the reliable suite.

For each checkpoint and budget, every member of ``conf/suite/compare.yaml`` (PGD-20, SegPGD-20, CosPGD-20: group
``papers``; APGD with SEA's three losses: group ``reliable``) attacks each case white-box through the scoring
sliding window (``--mode pipeline``) or on the papers' tiles; the case is scored by MONAI sliding-window
inference. The markdown table gives the mean foreground Dice per attack, the worst case per case within each
group, SEA's greedy pooled per-class Dice, and the forward/backward passes each group spent.

Cases are crops of the validation volumes (``--crop``) centred on foreground, so the run fits a shared CPU:

    python scripts/reliable_evidence.py runs/zoo/unet_small-lits117-clean --data lits117 --eps 4/255,8/255 \\
        --crop 64,64,48 --crops 2 --out /tmp/evidence.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

from robustseg.attacks import attack_volume
from robustseg.config import CONF_DIR, load_config
from robustseg.evaluation.ensemble import greedy_assignment, pooled_dice, worst_per_case
from robustseg.evaluation.resolve import load_checkpoint, run_checkpoint
from robustseg.evaluation.suite import as_list, build_suite

log = logging.getLogger("reliable_evidence")
GROUPS = ("papers", "reliable")


class Counter(nn.Module):
    """Counts forward calls and backward passes through the wrapped network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.forwards, self.backwards = net, 0, 0
        self.train(net.training)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        self.forwards += 1
        if out.requires_grad:
            out.register_hook(self._backward)
        return out

    def _backward(self, grad: Tensor) -> None:
        self.backwards += 1


def crops(image: Tensor, label: Tensor, size: list[int], count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` crops ``(1, C, *size)`` of a case ``(C, D, H, W)``: centred on each foreground class's centre of
    mass, then on seeded random foreground voxels; clipped to the volume."""
    fg = [torch.nonzero(label[0] == k).float() for k in range(1, int(label.max()) + 1)]
    centres = [c.mean(0).round().long() for c in fg if len(c)]
    everything = torch.nonzero(label[0] > 0)
    generator = torch.Generator().manual_seed(seed)
    while len(centres) < count and len(everything):
        centres.append(everything[torch.randint(len(everything), (1,), generator=generator)][0])
    out = []
    for centre in centres[:count]:
        start = [int(min(max(int(c) - s // 2, 0), max(n - s, 0))) for c, s, n in zip(centre, size, label.shape[1:])]
        box = tuple(slice(a, a + s) for a, s in zip(start, size))
        out.append((image[(slice(None), *box)][None].float(), label[(slice(None), *box)][None].long()))
    return out


def score(net: nn.Module, x: Tensor, label: Tensor, roi: tuple[int, ...], k: int) -> tuple[float, np.ndarray]:
    """Foreground mean Dice (both-empty = 1) and counts ``(3, K)`` (intersection, pred, label) of one case."""
    with torch.no_grad():
        pred = sliding_window_inference(x, roi, 2, net, overlap=0.5, mode="gaussian").argmax(1)[0]
    gold = label[0, 0]
    counts = np.array(
        [[int(((pred == c) & (gold == c)).sum()), int((pred == c).sum()), int((gold == c).sum())] for c in range(k)],
        dtype=np.float64,
    ).T  # (3, K)
    den = counts[1, 1:] + counts[2, 1:]
    dice = np.where(den > 0, 2 * counts[0, 1:] / np.maximum(den, 1), 1.0)
    return float(dice.mean()), counts


def seed_of(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("|".join(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


def evaluate_model(path: str, cases: list[tuple[Tensor, Tensor]], specs: list, mode: str) -> dict[str, Any]:
    ckpt = Path(path)
    model = load_checkpoint(run_checkpoint(ckpt) if ckpt.is_dir() else ckpt)
    counter = Counter(model.net)
    roi, k = tuple(model.roi_size), model.num_classes
    result: dict[str, Any] = {"model": model.label, "checkpoint": model.checkpoint, "budgets": {}}
    clean = [score(model.net, x, y, roi, k) for x, y in cases]
    result["clean"] = float(np.mean([d for d, _ in clean]))
    for spec in specs:
        row = result["budgets"].setdefault(spec.budget, {})
        before, start = (counter.forwards, counter.backwards), time.perf_counter()
        dice, counts = [], []
        for i, (x, y) in enumerate(cases):
            torch.manual_seed(seed_of(model.label, spec.label, spec.budget, str(i)))
            adversarial = attack_volume(spec.build(), counter, x, y, mode=mode, roi_size=roi, sw_batch_size=2)
            assert (adversarial - x).abs().max() <= spec.eps + 1e-6, "budget violated"
            d, c = score(model.net, adversarial, y, roi, k)
            dice.append(d)
            counts.append(c)
        row[spec.label] = {
            "group": spec.group,
            "dice": dice,
            "counts": np.stack(counts).tolist(),
            "forwards": counter.forwards - before[0],
            "backwards": counter.backwards - before[1],
            "seconds": time.perf_counter() - start,
        }
        log.info("%s %s %s: Dice %.4f", model.label, spec.label, spec.budget, float(np.mean(dice)))
    return result


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per budget: per-attack means, per-group worst case per case, greedy pooled Dice, passes."""
    rows = []
    for budget, attacks in result["budgets"].items():
        row: dict[str, Any] = {"model": result["model"], "budget": budget, "clean": result["clean"]}
        for label, a in attacks.items():
            row[label] = float(np.mean(a["dice"]))
        for group in GROUPS:
            labels = [label for label, a in attacks.items() if a["group"] == group]
            dice = np.array([attacks[label]["dice"] for label in labels]).T  # (cases, attacks)
            counts = np.array([attacks[label]["counts"] for label in labels]).transpose(1, 0, 2, 3)  # (N, A, 3, K)
            row[f"best single {group}"] = float(dice.mean(axis=0).min())
            row[f"worst {group}"] = float(worst_per_case(dice)[1].mean())
            row[f"pooled {group}"] = greedy_assignment(counts)[1]
            row[f"pooled best single {group}"] = min(pooled_dice(counts[:, j]) for j in range(len(labels)))
            row[f"passes {group}"] = (
                sum(attacks[label]["forwards"] for label in labels),
                sum(attacks[label]["backwards"] for label in labels),
            )
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], n_cases: int) -> str:
    head = (
        "| model | budget | clean | PGD-20 | SegPGD-20 | CosPGD-20 | papers: worst/case | APGD-mCE | APGD-bCE | "
        "APGD-JS | APGD-DiceCE | reliable: worst/case | pooled greedy papers / reliable | passes papers (fwd/bwd) | "
        "passes reliable (fwd/bwd) |"
    )
    lines = [head, "|" + " --- |" * 15]
    for r in rows:
        cells = [
            r["model"],
            r["budget"],
            f"{r['clean']:.3f}",
            *(f"{r[a]:.3f}" for a in ("pgd", "segpgd", "cospgd")),
            f"**{r['worst papers']:.3f}**",
            *(f"{r[a]:.3f}" for a in ("apgd_mce", "apgd_bce", "apgd_js", "apgd_dce")),
            f"**{r['worst reliable']:.3f}**",
            f"{r['pooled papers']:.3f} / {r['pooled reliable']:.3f}",
            "{} / {}".format(*r["passes papers"]),
            "{} / {}".format(*r["passes reliable"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nMean foreground Dice over {n_cases} case(s); worst/case: the lowest Dice per case over the group.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="run directories or .ckpt files")
    parser.add_argument("--data", default="lits117", help="conf/data name")
    parser.add_argument("--eps", default="4/255,8/255")
    parser.add_argument("--mode", default="pipeline", choices=["pipeline", "tiles"])
    parser.add_argument("--crop", default="64,64,48", help="case crop size D,H,W (0: whole volumes)")
    parser.add_argument("--crops", type=int, default=2, help="crops per validation volume")
    parser.add_argument("--max-volumes", type=int, default=1)
    parser.add_argument("--override", action="append", default=[], help="LABEL.FIELD=VALUE (e.g. apgd.steps=50)")
    parser.add_argument("--out", type=Path, required=True, help="markdown table; raw numbers go next to it as .json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    overrides: dict[str, dict[str, Any]] = {}
    for item in args.override:
        key, _, value = item.partition("=")
        label, _, field = key.partition(".")
        overrides.setdefault(label, {})[field] = json.loads(value) if value[:1].isdigit() else value
    specs = build_suite([], as_list(args.eps), None, CONF_DIR, overrides, suites=["compare"])

    from robustseg.data import build_datamodule

    cfg = load_config("evaluate", [f"data={args.data}", "logger=none"])
    datamodule = build_datamodule(cfg.data)
    datamodule.validate()
    dataset = datamodule.eval_dataset("validation")
    size = [int(s) for s in args.crop.split(",")]
    cases: list[tuple[Tensor, Tensor]] = []
    for i in range(min(args.max_volumes, len(dataset))):
        item = dataset[i]
        image, label = item["image"].as_tensor(), item["label"].as_tensor()
        if min(size) > 0:
            cases += crops(image, label, size, args.crops, seed=i)
        else:
            cases.append((image[None].float(), label[None].long()))
    log.info("%d case(s) of shape %s", len(cases), [tuple(x.shape[2:]) for x, _ in cases])

    results = [evaluate_model(c, cases, specs, args.mode) for c in args.checkpoints]
    rows = [row for result in results for row in summarise(result)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, len(cases)) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"results": results, "rows": rows}, indent=1, default=str))
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
