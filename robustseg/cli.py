"""Command-line entry points: ``train.py`` / ``evaluate.py`` and the ``robustseg-*`` console scripts.

User errors end the process with one clear message on stderr and exit code 2, no traceback: robustseg's own
errors (config, data, checkpoints, output locations; they name the key, file or value and what was expected)
and the operating system's refusals to write (a read-only ``output_dir``, a file where a directory is expected,
a full disk), which name the path and the reason.
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable, Sequence

from lightning.pytorch.utilities import rank_zero_only

from robustseg.config import help_text, load_config
from robustseg.errors import RobustsegError

EXIT_USER_ERROR = 2

# errno -> what the user can do about it
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or point output_dir at another disk",
    errno.EDQUOT: "the disk quota is exceeded: free space or point output_dir at another disk",
    errno.EROFS: "the file system is read-only: point output_dir at a writable directory",
    errno.EACCES: "permission denied: point output_dir at a directory you can write",
    errno.EPERM: "permission denied: point output_dir at a directory you can write",
    errno.EEXIST: "a file stands where a directory is expected: choose another output_dir",
    errno.ENOTDIR: "a file stands where a directory is expected: choose another output_dir",
    errno.EISDIR: "a directory stands where a file is expected",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the path(s), the system's reason and what to do."""
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
    reason = err.strerror or str(err) or type(err).__name__
    hint = _OS_HINTS.get(err.errno or -1)
    text = f"{where}: {reason}" if where else reason
    return f"{text} ({hint})" if hint else text


def one_line(text: str) -> str:
    """A message on one line: multi-line parts (e.g. a printed affine matrix) joined with single spaces."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


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
        sys.stderr.write(f"error: {one_line(str(err))}\n")
        return EXIT_USER_ERROR
    except OSError as err:  # read-only or full disk, a file where a directory should be: the user's to fix
        sys.stderr.write(f"error: {describe_os_error(err)}\n")
        return EXIT_USER_ERROR
    if result is not None and rank_zero_only.rank == 0:  # DDP processes launched by rank 0 stay quiet
        sys.stdout.write(f"{result}\n")
    return 0


def train_main(argv: Sequence[str] | None = None) -> int:
    from robustseg.training import train

    return main("train", train, argv)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    from robustseg.evaluation import evaluate

    return main("evaluate", evaluate, argv)
