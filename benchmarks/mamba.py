"""Selective scan: parallel (chunked) over sequential loop, side by side in one run; prints JSON.

Not a test: run ``python benchmarks/mamba.py`` (``--quick`` for a smoke run whose figures are not the claims).

Figures per sequence length L (512, 4096, 32768):

* ``forward_speedup`` and ``train_speedup``: sequential time / parallel time for a forward, and for a forward plus
  the backward to all inputs. Goal: >= 5x at L = 4096. Times are medians of rounds that alternate the two
  implementations, so machine load hits both alike. The sequential loop at 32768 gets fewer rounds (``--long-reps``).
* ``peak_rss_mb``: peak resident memory increase of one forward + backward over the post-setup baseline, each
  in a fresh subprocess (``resource.getrusage`` ru_maxrss).

Shape: batch 1, d_inner 64, d_state 16: U-Mamba_Enc's first-stage Mamba (d_model 32, expand 2), whose sequence is
every voxel of the feature map (32768 tokens = a 32^3 window). float32, ``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from robustseg.models.mamba import selective_scan, selective_scan_sequential

D_INNER, D_STATE = 64, 16
SCANS = {"parallel": selective_scan, "sequential": selective_scan_sequential}


def inputs(length: int, grad: bool) -> dict[str, torch.Tensor]:
    """Random scan arguments (selective_scan_fn layout) with a realistic dt range (softplus of N(-3, 1))."""
    g = torch.Generator().manual_seed(0)
    args = {
        "u": torch.randn(1, D_INNER, length, generator=g),
        "delta": torch.randn(1, D_INNER, length, generator=g) - 3.0,
        "A": -torch.arange(1, D_STATE + 1.0).repeat(D_INNER, 1),
        "B": torch.randn(1, D_STATE, length, generator=g),
        "C": torch.randn(1, D_STATE, length, generator=g),
        "D": torch.ones(D_INNER),
        "z": torch.randn(1, D_INNER, length, generator=g),
    }
    return {k: v.requires_grad_(grad) for k, v in args.items()}


def run_once(name: str, args: dict[str, torch.Tensor], backward: bool) -> float:
    start = time.perf_counter()
    y = SCANS[name](**args, delta_softplus=True)
    if backward:
        torch.autograd.grad(y.sum(), list(args.values()))
    return time.perf_counter() - start


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(name: str, length: int) -> None:
    """In a fresh process: peak RSS increase (MB) of one forward + backward; printed as JSON."""
    args = inputs(length, grad=True)
    run_once(name, inputs(64, grad=True), backward=True)  # warm up allocator and kernels on a tiny problem
    base = rss_mb()
    run_once(name, args, backward=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux
    print(json.dumps({"peak_rss_increase_mb": round(peak - base, 1)}))


def peak_rss(name: str, length: int, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", name, str(length), "--threads", str(threads)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_increase_mb"]


def measure(length: int, reps: int, long_reps: int, threads: int) -> dict[str, object]:
    seq_reps = long_reps if length > 8192 else reps
    result: dict[str, object] = {"length": length, "rounds": {"parallel": reps, "sequential": seq_reps}}
    for backward, key in ((False, "forward"), (True, "train")):
        args = inputs(length, grad=backward)
        times: dict[str, list[float]] = {"parallel": [], "sequential": []}
        for r in range(max(reps, seq_reps)):  # alternate, so load drifts hit both
            for name in SCANS:
                if r < (seq_reps if name == "sequential" else reps):
                    times[name].append(run_once(name, args, backward))
        par, seq = statistics.median(times["parallel"]), statistics.median(times["sequential"])
        result[f"{key}_seconds"] = {"parallel": round(par, 5), "sequential": round(seq, 5)}
        result[f"{key}_speedup"] = round(seq / par, 2)
    result["peak_rss_mb"] = {name: peak_rss(name, length, threads) for name in SCANS}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small lengths, 2 rounds: a smoke run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--long-reps", type=int, default=1, help="rounds of the sequential loop at L > 8192")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--child", nargs=2, metavar=("SCAN", "LENGTH"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.child:
        child(opts.child[0], int(opts.child[1]))
        return
    lengths = [128, 512] if opts.quick else [512, 4096, 32768]
    reps, long_reps = (2, 1) if opts.quick else (opts.reps, opts.long_reps)
    report = {
        "shape": {"batch": 1, "d_inner": D_INNER, "d_state": D_STATE, "dtype": "float32"},
        "threads": opts.threads,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
        "results": [measure(length, reps, long_reps, opts.threads) for length in lengths],
        "load_average_at_end": os.getloadavg(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
