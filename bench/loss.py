"""Benchmark: the full-softmax L_rec (Eq. 4) computed in row chunks against the whole logit matrix at once.

    python bench/loss.py [--shapes 25600x7101 4096x100000] [--rounds 5] [--threads 1]

For each ROWSxITEMS shape (d = 32, cosine / temperature logits, padding item excluded), one forward and
backward of `autocdsr.objectives.losses.full_softmax_loss` (chunked, the default chunk for the device) and
of the direct computation (`cosine_logits` → `F.cross_entropy`, the implementation it replaced), interleaved
A B A B ... in one process; reported: the median time of each and the median per-round ratio. Peak memory:
each variant runs once more in its own fresh process, which reports its peak resident set minus its resident
set before the step (Linux ``/proc/self/status``). 25600x7101 is SASRec's 128 × 200 batch on the generated data's
catalogue (`bench/step_time.py`). The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr.objectives.losses import cosine_logits, full_softmax_loss  # noqa: E402

TEMPERATURE = 0.05
D = 32


def materialised(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = cosine_logits(user, items, TEMPERATURE)
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


def chunked(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return full_softmax_loss(user, items, targets, TEMPERATURE)


VARIANTS = {"chunked": chunked, "materialised": materialised}


def inputs(rows: int, items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(rows, D, generator=gen).requires_grad_()
    table = torch.randn(items, D, generator=gen).requires_grad_()
    return user, table, torch.randint(1, items, (rows,), generator=gen)


def one_step(name: str, user: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> float:
    user.grad = table.grad = None
    start = time.process_time()
    VARIANTS[name](user, table, targets).backward()
    return time.process_time() - start


def _vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: this process's peak resident set; reset by exec, unlike
    ``ru_maxrss``, which a child inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_mib(name: str, rows: int, items: int) -> float:
    """Peak resident-set growth of one step of ``name`` in a fresh process (MiB)."""
    code = (
        "import sys, torch; torch.set_num_threads(1);"
        f"sys.path.insert(0, {str(REPO / 'bench')!r}); import loss as b;"
        f"u, t, y = b.inputs({rows}, {items}); before = b._vm_kib('VmRSS');"
        f"b.one_step({name!r}, u, t, y);"
        "print((b._vm_kib('VmHWM') - before) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/loss.py",
        description="Chunked vs materialised full-softmax L_rec: time and peak memory.",
    )
    parser.add_argument("--shapes", nargs="+", default=["25600x7101", "4096x100000"], help="ROWSxITEMS")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of A B (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"{'rows x items':>16} {'chunked s':>10} {'materialised s':>15} {'ratio':>7} {'peak MiB c/m':>16}")
    report = {}
    for text in args.shapes:
        rows, items = (int(v) for v in text.lower().split("x"))
        user, table, targets = inputs(rows, items)
        for name in VARIANTS:  # warm-up
            one_step(name, user, table, targets)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                times[name].append(one_step(name, user, table, targets))
        ratio = statistics.median(c / m for c, m in zip(times["chunked"], times["materialised"], strict=True))
        row = {
            "chunked_s": statistics.median(times["chunked"]),
            "materialised_s": statistics.median(times["materialised"]),
            "chunked_over_materialised": ratio,
        }
        if not args.no_memory:
            row["chunked_peak_mib"] = peak_mib("chunked", rows, items)
            row["materialised_peak_mib"] = peak_mib("materialised", rows, items)
        report[text] = row
        mem = "" if args.no_memory else f"{row['chunked_peak_mib']:.0f} / {row['materialised_peak_mib']:.0f}"
        print(f"{text:>16} {row['chunked_s']:>10.3f} {row['materialised_s']:>15.3f} {ratio:>6.2f}x {mem:>16}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
