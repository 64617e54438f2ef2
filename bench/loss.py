"""Benchmark: L_rec (Eq. 4) computed in row chunks against the whole logit matrix at once.

    python bench/loss.py [--shapes 25600x7101 4096x100000 3200x944000:4096] [--rounds 5] [--threads 1]

For each ROWSxITEMS shape (d = 32, cosine / temperature logits, padding item excluded), one forward and
backward of `autocdsr.objectives.losses.full_softmax_loss` (chunked, the default chunk for the device) and
of the direct computation (`cosine_logits` → `F.cross_entropy`, the implementation it replaced); for a
ROWSxITEMS:M shape the same for `sampled_softmax_loss` with M negatives (uniform proposal, the same draw)
against its former one-matrix implementation. Interleaved A B B A ... in one process; reported: the median
time of each and the median per-round ratio. Peak memory: each variant runs once more in its own fresh
process, which reports its peak resident set minus its resident set before the step (Linux
``/proc/self/status``). 25600x7101 is SASRec's 128 × 200 batch on the generated data's catalogue
(`bench/step_time.py`); 3200x944000:4096 the KuaiRand CPU runs of docs/results.md (batch 64 × length 50,
4,096 negatives). The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr.objectives.losses import (  # noqa: E402
    cosine_logits,
    full_softmax_loss,
    sampled_softmax_loss,
    sampling_log_q,
)

TEMPERATURE = 0.05
D = 32


def materialised(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = cosine_logits(user, items, TEMPERATURE)
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


def chunked(user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return full_softmax_loss(user, items, targets, TEMPERATURE)


def sampled_materialised(
    user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """The sampled softmax as it was before chunking: the whole [rows, M] logits, the same draw."""
    log_q = sampling_log_q(torch.ones(len(items)))
    negatives = torch.multinomial(log_q.exp(), num_samples, replacement=True, generator=_generator())
    user_n = F.normalize(user, dim=-1) / TEMPERATURE
    pos = (user_n * F.normalize(items[targets], dim=-1)).sum(-1, keepdim=True)
    neg = user_n @ F.normalize(items[negatives], dim=-1).T - (log_q[negatives] + math.log(num_samples))
    neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    return (torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos.squeeze(1)).mean()


def sampled_chunked(
    user: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, num_samples: int
) -> torch.Tensor:
    log_q = sampling_log_q(torch.ones(len(items)))
    return sampled_softmax_loss(user, items, targets, TEMPERATURE, log_q, num_samples, _generator())


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


VARIANTS = ("chunked", "materialised")


def loss_of(
    name: str, num_samples: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``name`` of VARIANTS; full softmax when ``num_samples`` is 0, else sampled with that many negatives."""
    if not num_samples:
        return chunked if name == "chunked" else materialised
    fn = sampled_chunked if name == "chunked" else sampled_materialised
    return lambda u, x, t: fn(u, x, t, num_samples)


def inputs(rows: int, items: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    user = torch.randn(rows, D, generator=gen).requires_grad_()
    table = torch.randn(items, D, generator=gen).requires_grad_()
    return user, table, torch.randint(1, items, (rows,), generator=gen)


def one_step(
    name: str, user: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, num_samples: int = 0
) -> float:
    user.grad = table.grad = None
    start = time.process_time()
    loss_of(name, num_samples)(user, table, targets).backward()
    return time.process_time() - start


def _vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: this process's peak resident set; reset by exec, unlike
    ``ru_maxrss``, which a child inherits from its parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_mib(name: str, rows: int, items: int, num_samples: int = 0) -> float:
    """Peak resident-set growth of one step of ``name`` in a fresh process (MiB)."""
    code = (
        "import sys, torch; torch.set_num_threads(1);"
        f"sys.path.insert(0, {str(REPO / 'bench')!r}); import loss as b;"
        f"u, t, y = b.inputs({rows}, {items}); before = b._vm_kib('VmRSS');"
        f"b.one_step({name!r}, u, t, y, {num_samples});"
        "print((b._vm_kib('VmHWM') - before) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python bench/loss.py",
        description="Chunked vs materialised L_rec (full and sampled softmax): time and peak memory.",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=["25600x7101", "4096x100000", "3200x944000:4096", "25600x100000:16384"],
        help="ROWSxITEMS (full softmax) or ROWSxITEMS:M (sampled softmax, M negatives)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of A B (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(
        f"{'rows x items[:M]':>20} {'chunked s':>10} {'materialised s':>15} {'ratio':>7} {'peak MiB c/m':>16}"
    )
    report = {}
    for text in args.shapes:
        size, _, sampled = text.lower().partition(":")
        rows, items = (int(v) for v in size.split("x"))
        num_samples = int(sampled or 0)
        user, table, targets = inputs(rows, items)
        for name in VARIANTS:  # warm-up
            one_step(name, user, table, targets, num_samples)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for r in range(args.rounds):
            order = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                times[name].append(one_step(name, user, table, targets, num_samples))
        ratio = statistics.median(c / m for c, m in zip(times["chunked"], times["materialised"], strict=True))
        row = {
            "chunked_s": statistics.median(times["chunked"]),
            "materialised_s": statistics.median(times["materialised"]),
            "chunked_over_materialised": ratio,
        }
        if not args.no_memory:
            row["chunked_peak_mib"] = peak_mib("chunked", rows, items, num_samples)
            row["materialised_peak_mib"] = peak_mib("materialised", rows, items, num_samples)
        report[text] = row
        mem = "" if args.no_memory else f"{row['chunked_peak_mib']:.0f} / {row['materialised_peak_mib']:.0f}"
        print(f"{text:>20} {row['chunked_s']:>10.3f} {row['materialised_s']:>15.3f} {ratio:>6.2f}x {mem:>16}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
