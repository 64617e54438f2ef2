"""Benchmark: the host time of AutoCDSR⁺'s per-batch packing plan, in the encoder against in the data path.

    python bench/ib_plan.py [--data OUT] [--shapes 128x800 128x200] [--batches 8] [--device cuda]

AutoCDSR⁺ (`autocdsr/models/ib.py`) packs each batch's tokens into per-domain rows; the plan of that packing
(`LayoutPlan`, NumPy) depends only on the batch's domain tags and padding. Two ways to get it to the layers:
- in the encoder (`DomainLayout.from_batch`, what evaluation and batches without a plan do): the training
  thread reads the tags back from the device, plans, and uploads;
- in the data path (what training does: `batching.TrainBatcher` with ``ib_plan``, inside Ray Data's collate
  threads): the plan is built next to the batch, and the training thread only uploads it
  (`DomainLayout(plan, ...)`: one host-to-device copy; the causal IB queries' masks are built on the device).

Reported per backbone and batch shape, median over ``--batches`` distinct batches (interleaved, after one
warm-up batch): milliseconds of host time for the whole in-encoder path, for building the plan (moved to the
data path) and for what stays on the training thread. Host time, not device time: at d = 32 the GPU steps
are bound by the host (docs/benchmarks.md). Before each measurement the device is synchronised, so the
in-encoder path's device-to-host read of the tags waits for nothing here; inside a training step it waits
for the queued kernels. Every layout built from a data-path plan is checked equal to the in-encoder one.

Batches: ``--data`` = a sequence build (`jobs/build_sequences.py` output; rows of its train split drawn at
random), else synth-like rows (`bench/step_time.py`'s generator). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import step_time  # noqa: E402

from autocdsr.data import batching  # noqa: E402
from autocdsr.data.shards import list_arrays, list_split_files, open_dataset  # noqa: E402
from autocdsr.models.config import ModelConfig  # noqa: E402
from autocdsr.models.ib import DomainLayout  # noqa: E402


def rows_source(data: str | None, rng: np.random.Generator):
    """``draw(n, length) -> (items, domains)``: n rows of at least ``length`` events where the data allows,
    and the number of domains."""
    if data is None:
        num_domains = len(step_time.DEFAULT_DOMAINS)

        def draw(n: int, length: int):
            return step_time.make_sequences(n, length, 0.7, rng)

        return draw, num_domains
    info = open_dataset(data)
    files = list_split_files(info, "train")
    items, domains = [], []
    for f in files:
        table = pq.read_table(f, columns=["item_idx", "domain_idx"])
        items += list_arrays(table.column("item_idx"))
        domains += list_arrays(table.column("domain_idx"))

    def draw(n: int, length: int):
        pick = rng.choice(len(items), size=n)
        return [items[i] for i in pick], [domains[i] for i in pick]

    return draw, info.vocab.num_domains


def same_layout(a: DomainLayout, b: DomainLayout) -> bool:
    names = ["q_all", "kv_all", "slot_of", "slot_items", "row_seq", "row_dom", "k_ext", "v_ext"]
    names += ["own_ib", "prev_run", "prev_same", "run_dom"] if a.causal else ["q_ext"]
    if [x[:3] for x in a.buckets] != [x[:3] for x in b.buckets] or (a.M, a.Mx) != (b.M, b.Mx):
        return False
    masks = all(
        (x[3] is None and y[3] is None) or torch.equal(x[3], y[3])
        for x, y in zip(a.buckets, b.buckets, strict=True)
    )
    return masks and all(torch.equal(getattr(a, n), getattr(b, n)) for n in names)


def measure(args: argparse.Namespace, backbone: str, shape: step_time.Shape, draw, num_domains: int) -> dict:
    device = torch.device(args.device)
    cfg = ModelConfig(
        backbone=backbone, num_items=10**6, num_domains=num_domains, max_len=shape.length,
        d_model=32, n_layers=6, n_heads=4, ib=True, num_ib_tokens=args.ib_tokens,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"in_encoder": [], "plan": [], "upload": []}
    for i in range(args.batches + 1):
        items, doms = draw(shape.batch, shape.length + 1)
        if backbone == "sasrec":
            host = batching.sasrec_batch(items, doms, shape.length)
        else:
            host = batching.cloze_batch(items, doms, shape.length, step_time.MASK_PROB, 10**6 + 1, rng)
        dom_host, valid_host = host["domain_idx"], host["item_idx"] != 0
        dom_dev, valid_dev = dom_host.to(device), valid_host.to(device)
        sync()
        t0 = time.perf_counter()
        inline = DomainLayout.from_batch(dom_dev, valid_dev, cfg, torch.float32)
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        plan = batching.layout_plan(host, backbone, num_domains, args.ib_tokens)
        t3 = time.perf_counter()
        uploaded = DomainLayout(plan, cfg, torch.float32, device)
        t4 = time.perf_counter()
        sync()
        if not same_layout(inline, uploaded):
            raise AssertionError(
                f"{backbone} {shape}: the data-path plan's layout differs from the encoder's"
            )
        if i > 0:  # the first batch warms up allocators and kernels
            times["in_encoder"].append(t1 - t0)
            times["plan"].append(t3 - t2)
            times["upload"].append(t4 - t3)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "backbone": backbone,
        "shape": str(shape),
        "in_encoder_ms": round(med["in_encoder"], 2),
        "plan_ms": round(med["plan"], 2),
        "training_thread_ms": round(med["upload"], 2),
        "training_thread_share": round(med["upload"] / med["in_encoder"], 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", help="a sequence build (OUT of jobs/build_sequences.py); default synth-like rows"
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        type=step_time.Shape.parse,
        default=[step_time.Shape(128, 800), step_time.Shape(128, 200)],
    )
    parser.add_argument(
        "--backbones", nargs="+", choices=["sasrec", "bert4rec"], default=["sasrec", "bert4rec"]
    )
    parser.add_argument("--batches", type=int, default=8, help="timed batches per row (after one warm-up)")
    parser.add_argument("--ib-tokens", type=int, default=1, help="IB tokens per domain (T)")
    parser.add_argument("--device", default="cpu", help="where the layout goes: cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    draw, num_domains = rows_source(args.data, np.random.default_rng(1))
    rows = [measure(args, b, s, draw, num_domains) for b in args.backbones for s in args.shapes]
    print(f"# {platform.node()} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"device {args.device}, data {args.data or 'synth-like'}, T = {args.ib_tokens}")  # fmt: skip
    print(
        "| backbone | batch | in the encoder (ms) | plan, now in the data path (ms) | left on the training thread (ms) |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backbone']} | {r['shape']} | {r['in_encoder_ms']:.1f} | {r['plan_ms']:.1f} | "
              f"{r['training_thread_ms']:.1f} ({r['training_thread_share']:.0%}) |")  # fmt: skip
    result = {"device": args.device, "data": args.data or "synth", "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
