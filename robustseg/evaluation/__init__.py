"""Evaluation of segmentation models under white-box and transfer attacks (Malik et al., BMVC 2024).

Public API: ``evaluate(cfg) -> Path`` (the output directory), used by ``evaluate.py``; the building blocks live in
``metrics`` (Dice, HD95 mm, NSD, perturbation metrics), ``store`` (adversarial volumes + provenance), ``records``
(resumable per-case JSONL), ``shard`` (split/merge), ``checks`` (sanity flags), ``summary`` and ``report``.
"""

from __future__ import annotations

from robustseg.evaluation.pipeline import evaluate, finalize

__all__ = ["evaluate", "finalize"]
