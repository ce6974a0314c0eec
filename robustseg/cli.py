"""Command-line entry points: ``train.py`` / ``evaluate.py`` and the ``robustseg-*`` console scripts.

User errors (config, data, checkpoints) end the process with one clear message and exit code 2, no traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from lightning.pytorch.utilities import rank_zero_only

from robustseg.config import help_text, load_config
from robustseg.errors import RobustsegError


def main(name: str, run: Callable, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` for ``conf/<name>.yaml``, call ``run(cfg)``; return the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(help_text(name) + "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(name, argv)
        result = run(cfg)
    except RobustsegError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    if result is not None and rank_zero_only.rank == 0:  # DDP processes launched by rank 0 stay quiet
        sys.stdout.write(f"{result}\n")
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    from robustseg.training import train

    return main("train", train, argv)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    from robustseg.evaluation import evaluate

    return main("evaluate", evaluate, argv)
