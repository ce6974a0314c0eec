"""Evaluation of segmentation models under white-box and transfer attacks (Malik et al., BMVC 2024).

Public API: ``evaluate(cfg) -> Path`` (the output directory), used by ``evaluate.py``; the building blocks live in
``pipeline`` (settings -> results), ``runner`` (the loop), ``scoring`` (eval-mode passes, per-prediction scores),
``region`` (the real voxels of a case), ``identity`` (what a result depends on), ``store`` (adversarial volumes +
provenance), ``records`` (resumable per-case JSONL), ``shard`` (split/merge), ``costs``, ``lock``, ``progress``,
``validate``, ``resolve`` / ``modelinfo`` (which model, exactly), ``metrics``, ``checks`` / ``sanity`` (flags),
``summary``, ``report``.
"""

from __future__ import annotations

from robustseg.evaluation.pipeline import evaluate, finalize

__all__ = ["evaluate", "finalize"]
