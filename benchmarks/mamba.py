"""U-Mamba at the paper plan and the selective scan, measured side by side in one run; prints JSON.

Not a test: run ``python benchmarks/mamba.py`` (``--quick`` for a smoke run whose figures are not the claims).

``models``: one fresh subprocess per model and size, paper plan (6 stages, 32-320 features, 14 classes, ``img_size``
= the input, so UMamba-Enc's official channel-token rule applies), parameters frozen, eval mode, pure-PyTorch scan:

* ``bare_pass_seconds``: one bare pass on 2 x 1 x S^3 (``--sizes``, default 64) = forward plus the backward to the
  input only, as in an attack step; wall time and the process's CPU time, ``--threads`` threads (default 1).
* ``peak_rss_mb``: the child's peak resident memory (``ru_maxrss``: sees every torch allocation), and
  ``baseline_rss_mb``: its resident memory just before the pass (interpreter, torch, weights).
* ``mamba_seconds``: the Mamba layers' share of the pass, timed alone on their own inputs (forward + input
  backward), to show what bounds the ratio.
* ``enc_over_bot``: UMamba-Enc over UMamba-Bot for time and peak memory. Goals: both <= 1.5.

``--write-eval-models DIR`` (no measurement): untrained paper-plan ``umamba_enc``, ``umamba_bot`` and ``unet`` for
the synthetic data (32^3 ROI, 3 classes, as ``conf/model/*.yaml`` with ``data=synthetic``) as external-model specs
``DIR/<name>.yaml`` + state dicts, for timing ``python evaluate.py --target DIR/umamba_enc.yaml ... data=synthetic``.

``scan``, per sequence length L (512, 4096, 32768): the chunked scan (``selective_scan``) against the sequential
loop, batch 1, d_inner 64, d_state 16 (U-Mamba_Enc's first-stage Mamba; 32768 tokens = a 32^3 window):

* ``forward_speedup`` and ``train_speedup``: sequential time / chunked time for a forward, and for a forward plus the
  backward to all inputs. Goal: >= 5x at L = 4096. Medians of rounds that alternate the two, so machine load hits
  both alike; the sequential loop at 32768 gets ``--long-reps`` rounds.
* ``peak_rss_mb``: peak resident memory increase of one forward + backward, each in a fresh subprocess (VmHWM,
  reset after setup: import-time peaks excluded).
* ``chunked_peak_rss_mb_at``: the chunked scan's increase at 4x and 16x the longest L (memory bounded by the chunk:
  it grows with L only through the (b, d, L) inputs and gradients, not with L x d_state).
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

from robustseg.models import MODELS
from robustseg.models.selective_scan import selective_scan, selective_scan_sequential
from robustseg.models.umamba import MambaLayer

D_INNER, D_STATE = 64, 16
SCANS = {"chunked": selective_scan, "sequential": selective_scan_sequential}
MODEL_NAMES = ("umamba_bot", "umamba_enc")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux


def reset_peak() -> None:
    """Restart the kernel's peak-RSS count (VmHWM) here, so import-time peaks do not hide the measured one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak` (Linux VmHWM), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def in_child(args: list[str], threads: int) -> dict:
    """Run this script with ``args`` in a fresh interpreter; its last stdout line is JSON."""
    out = subprocess.run(
        [sys.executable, __file__, *args, "--threads", str(threads)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- models
def bare_pass(net: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Forward + backward to the input only; (wall, CPU) seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    x = x.detach().requires_grad_()
    torch.autograd.grad(net(x).float().square().mean(), x)
    return time.perf_counter() - wall, time.process_time() - cpu


def model_child(name: str, size: int) -> None:
    """In a fresh process: one bare pass of the paper-plan model on 2 x 1 x size^3; prints JSON."""
    net = MODELS.build({"name": name, "in_channels": 1, "out_channels": 14, "img_size": (size,) * 3, "scan": "chunked"})
    net.eval().requires_grad_(False)
    layers: list[tuple[MambaLayer, torch.Tensor]] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, inp: layers.append((mod, inp[0].detach())))
        for m in net.modules()
        if isinstance(m, MambaLayer)
    ]
    x = torch.rand(2, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    baseline = rss_mb()
    wall, cpu = bare_pass(net, x)
    peak = peak_mb()
    for h in hooks:
        h.remove()
    mamba_wall = mamba_cpu = 0.0
    for layer, inp in layers:  # the Mamba layers alone, on the inputs they saw
        w, c = bare_pass(layer, inp)
        mamba_wall, mamba_cpu = mamba_wall + w, mamba_cpu + c
    report = {
        "bare_pass_seconds": {"wall": round(wall, 2), "cpu": round(cpu, 2)},
        "mamba_seconds": {"wall": round(mamba_wall, 2), "cpu": round(mamba_cpu, 2)},
        "mamba_tokens": [tuple(inp.shape) for _, inp in layers],
        "peak_rss_mb": round(peak),
        "baseline_rss_mb": round(baseline),
    }
    print(json.dumps(report))


def measure_models(sizes: list[int], threads: int) -> list[dict]:
    results = []
    for size in sizes:
        entry: dict[str, object] = {"input": [2, 1, size, size, size]}
        for name in MODEL_NAMES:
            entry[name] = in_child(["--child-model", name, str(size)], threads)
        bot, enc = entry["umamba_bot"], entry["umamba_enc"]
        entry["enc_over_bot"] = {
            "bare_pass_wall": round(enc["bare_pass_seconds"]["wall"] / bot["bare_pass_seconds"]["wall"], 2),
            "bare_pass_cpu": round(enc["bare_pass_seconds"]["cpu"] / bot["bare_pass_seconds"]["cpu"], 2),
            "peak_rss": round(enc["peak_rss_mb"] / bot["peak_rss_mb"], 2),
            "peak_rss_above_baseline": round(
                (enc["peak_rss_mb"] - enc["baseline_rss_mb"]) / (bot["peak_rss_mb"] - bot["baseline_rss_mb"]), 2
            ),
        }
        results.append(entry)
    return results


EVAL_MODELS = {  # the conf/model presets' architecture at the synthetic data's ROI and classes
    "umamba_enc": {"img_size": [32, 32, 32]},
    "umamba_bot": {"img_size": [32, 32, 32]},
    "unet": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"},
}


def write_eval_models(out_dir: str) -> None:
    """Untrained (seeded) paper-plan models as external specs that ``evaluate.py --target`` loads (timing only)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, kwargs in EVAL_MODELS.items():
        torch.manual_seed(0)
        net = MODELS.build({"name": name, "in_channels": 1, "out_channels": 3, **kwargs})
        torch.save(net.state_dict(), os.path.join(out_dir, f"{name}.pt"))
        spec = {
            "name": f"{name}-untrained",
            "state_dict": f"{name}.pt",
            "architecture": {"name": name, **kwargs},
            "num_classes": 3,
            "in_channels": 1,
            "roi_size": [32, 32, 32],
        }
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            json.dump(spec, f, indent=2)  # JSON is YAML


# ------------------------------------------------------------------------------------------------- scan
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


def scan_child(name: str, length: int) -> None:
    """In a fresh process: peak RSS increase (MB) of one forward + backward; printed as JSON."""
    args = inputs(length, grad=True)
    run_once(name, inputs(64, grad=True), backward=True)  # warm up allocator and kernels on a tiny problem
    base = rss_mb()
    reset_peak()
    run_once(name, args, backward=True)
    print(json.dumps({"peak_rss_increase_mb": round(hwm_mb() - base, 1)}))


def measure_scan(length: int, reps: int, long_reps: int, threads: int) -> dict[str, object]:
    seq_reps = long_reps if length > 8192 else reps
    result: dict[str, object] = {"length": length, "rounds": {"chunked": reps, "sequential": seq_reps}}
    for backward, key in ((False, "forward"), (True, "train")):
        args = inputs(length, grad=backward)
        times: dict[str, list[float]] = {"chunked": [], "sequential": []}
        for r in range(max(reps, seq_reps)):  # alternate, so load drifts hit both
            for name in SCANS:
                if r < (seq_reps if name == "sequential" else reps):
                    times[name].append(run_once(name, args, backward))
        par, seq = statistics.median(times["chunked"]), statistics.median(times["sequential"])
        result[f"{key}_seconds"] = {"chunked": round(par, 5), "sequential": round(seq, 5)}
        result[f"{key}_speedup"] = round(seq / par, 2)
    result["peak_rss_mb"] = {
        name: in_child(["--child-scan", name, str(length)], threads)["peak_rss_increase_mb"] for name in SCANS
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: a smoke run")
    parser.add_argument("--sizes", default="64", help="model input sides, comma-separated (96 needs ~30 GB)")
    parser.add_argument("--skip-models", action="store_true")
    parser.add_argument("--skip-scan", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--long-reps", type=int, default=1, help="rounds of the sequential loop at L > 8192")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--write-eval-models", metavar="DIR", help="write untrained eval specs to DIR and exit")
    parser.add_argument("--child-scan", nargs=2, metavar=("SCAN", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--child-model", nargs=2, metavar=("NAME", "SIZE"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    if opts.child_scan:
        scan_child(opts.child_scan[0], int(opts.child_scan[1]))
        return
    if opts.write_eval_models:
        write_eval_models(opts.write_eval_models)
        return
    if opts.child_model:
        model_child(opts.child_model[0], int(opts.child_model[1]))
        return
    lengths = [128, 512] if opts.quick else [512, 4096, 32768]
    sizes = [32] if opts.quick else [int(s) for s in opts.sizes.split(",")]
    reps, long_reps = (2, 1) if opts.quick else (opts.reps, opts.long_reps)
    report: dict[str, object] = {
        "threads": opts.threads,
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    if not opts.skip_models:
        report["models"] = measure_models(sizes, opts.threads)
    if not opts.skip_scan:
        report["scan"] = {
            "shape": {"batch": 1, "d_inner": D_INNER, "d_state": D_STATE, "dtype": "float32"},
            "results": [measure_scan(length, reps, long_reps, opts.threads) for length in lengths],
            "chunked_peak_rss_mb_at": {
                str(k * lengths[-1]): in_child(["--child-scan", "chunked", str(k * lengths[-1])], opts.threads)[
                    "peak_rss_increase_mb"
                ]
                for k in (4, 16)
            },
        }
    report["load_average_at_end"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
