"""AAM vs full attention (fused SDPA) on CPU: forward time, peak memory, error vs a same-pattern reference.

    python benchmarks/bench_attention.py [--lengths 1024,4096,8192,16384] [--repeats 3] [--flex-lengths 8192]

Setup: batch 1, D = 512 (8 heads x 64), window 256, 16 global tokens, 2 threads, no padding, eval mode,
``torch.no_grad``. Both timings cover the whole module forward, q/k/v/o projections included (AAM also
runs its gate and global path). Peak memory is the resident-set high-water mark (VmHWM) of a fresh
subprocess, reset through /proc/self/clear_refs after setup and warm-up, minus the RSS at reset, with
glibc's dynamic mmap threshold pinned so that freed tensors go back to the OS and cannot hide a peak.
The error is the max |AAM - reference| over a subset of query rows, the reference being the same sparse
pattern computed densely with explicit masks (``mm.attention.dense_reference``).
The timings are wall clock: on a shared machine, compare them with ``loadavg_1min_before_after``.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mm.attention import AdaptiveAttention, FullAttention, dense_reference  # noqa: E402
from mm.config import AttentionConfig  # noqa: E402

DIM, HEADS, WINDOW, N_GLOBAL, THREADS = 512, 8, 256, 16, 2
REF_ROWS = 256  # query rows checked against the dense reference


def build(kind: str, impl: str = "chunked") -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AttentionConfig(dim=DIM, n_heads=HEADS, window=WINDOW, n_global=N_GLOBAL, impl=impl)
    model = AdaptiveAttention(cfg) if kind == "aam" else FullAttention(cfg)
    return model.eval()


def time_ms(models: dict[str, torch.nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward ms per model; the models alternate within each repeat so load drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x)  # warm-up (and, for flex, compile)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: round(statistics.median(ts), 2) for name, ts in times.items()}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_child(kind: str, length: int, impl: str) -> None:
    """Run in a fresh subprocess: print the forward's peak RSS growth in MB."""
    torch.set_num_threads(THREADS)
    model = build(kind, impl)
    x = torch.randn(1, length, DIM)
    with torch.no_grad():
        model(x)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = _status_kb("VmRSS")
        model(x)
        peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": (peak - base) / 1024}))


def peak_mb(kind: str, length: int, impl: str = "chunked") -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--peak-child", f"{kind},{length},{impl}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return round(json.loads(out.strip().splitlines()[-1])["peak_mb"], 1)


def max_err(model: AdaptiveAttention, x: torch.Tensor) -> float:
    t = x.shape[1]
    rows = torch.unique(torch.cat([torch.arange(min(t, 64)), torch.linspace(0, t - 1, REF_ROWS).long()]))
    with torch.no_grad():
        fast = model(x).output[:, rows]
        ref = dense_reference(model, x, rows=rows)
    return float((fast - ref).abs().max())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,8192,16384")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--flex-lengths", default="8192", help="lengths at which flex is also timed ('' = none)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads for the timings")
    p.add_argument("--peak-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        kind, length, impl = args.peak_child.split(",")
        peak_child(kind, int(length), impl)
        return
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    lengths = [int(n) for n in args.lengths.split(",") if n]
    flex_lengths = {int(n) for n in args.flex_lengths.split(",") if n}
    aam, full = build("aam"), build("full")
    results = []
    for t in lengths:
        x = torch.randn(1, t, DIM, generator=torch.Generator().manual_seed(t))
        row: dict[str, float | int | None] = {"length": t}
        models = {"aam_ms": aam, "sdpa_ms": full}
        if t in flex_lengths:
            flex = build("aam", "flex")
            start = time.perf_counter()
            with torch.no_grad():
                flex(x)
            row["flex_first_call_s"] = round(time.perf_counter() - start, 1)  # compile (cached on disk)
            models["aam_flex_ms"] = flex
        row.update(time_ms(models, x, args.repeats))
        row["speedup"] = round(row["sdpa_ms"] / row["aam_ms"], 2)
        if not args.no_memory:
            row["aam_peak_mb"] = peak_mb("aam", t)
            row["sdpa_peak_mb"] = peak_mb("full", t)
            row["peak_ratio"] = round(row["aam_peak_mb"] / max(row["sdpa_peak_mb"], 1e-9), 2)
        row["max_abs_err_vs_reference"] = max_err(aam, x)
        print(json.dumps(row), flush=True)
        results.append(row)
    summary = {
        "benchmark": "attention",
        "setup": {
            "batch": 1,
            "dim": DIM,
            "heads": HEADS,
            "window": WINDOW,
            "n_global": N_GLOBAL,
            "threads": args.threads,
            "repeats": args.repeats,
            "aam_impl": "chunked (what impl='auto' picks on CPU)",
            "timing": "median forward ms under no_grad, q/k/v/o projections included in both",
            "memory": "VmHWM - VmRSS of one forward in a fresh subprocess (clear_refs reset, "
            "MALLOC_MMAP_THRESHOLD_=65536)",
            "reference": f"dense explicit band+global masks on {REF_ROWS}+ query rows",
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "results": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
