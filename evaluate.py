"""Evaluate models under white-box and transfer attacks: ``python evaluate.py --help``."""

from robustseg.cli import evaluate_main

if __name__ == "__main__":
    raise SystemExit(evaluate_main())
