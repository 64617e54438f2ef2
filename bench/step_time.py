"""Benchmark: time of one full training step of `cd`, `cd+autocdsr` and `cd+autocdsr_plus`, both backbones.

    python bench/step_time.py [--quick] [--shapes 16x800 128x200] [--update-every 10 1] [--quality]
    python bench/step_time.py --device cuda [--amp] ...     # on a GPU (bench/gpu.sh), bf16 autocast with --amp

A step is what `autocdsr.training.train_worker` does per batch: forward, `LossBalancer.backward`, gradient
clipping, AdamW step. Every variant gets its own model (same seed, same shape: d = 32, 6 layers, 4 heads by
default) and sees the same batches. Variants run side by side in one process, interleaved in blocks
(A B C ... A B C ...), so load from other processes hits all of them alike; a block is `lcm(update_every)`
consecutive steps, so a block of `cd+autocdsr` with update_every = N holds its solve steps in their true
proportion. Reported: the median over blocks of the mean step time, and its ratio to `cd`.

Variants (ratios are to `cd`):
- `cd`: L_rec only, a_cd not computed (need_a_cd=False), one backward;
- `cd+autocdsr/N`: a_cd (Eq. 5) inside the attention, Pareto weights re-solved every N steps (two backward
  passes on solve steps, one weighted backward in between);
- `cd+autocdsr_plus/N`: IB tokens (Eq. 13-14, per-domain block-diagonal attention), same balancer; its
  step includes building the batch's packing plan, as for batches without one (the conservative figure);
- `cd+autocdsr_plus reuse step, plan from the data path`: its reuse step on batches that carry their plan,
  built outside the timed step, as training batches do (`batching.TrainBatcher`, `ib_plan`).

Batches are synth-like: per sequence a Dirichlet mix over the generator's four domains (`autocdsr.synth`),
domain runs from a sticky chain (`--stickiness`: probability of staying in the previous event's domain),
Zipf item popularity inside each domain; every row is full (no padding), the costliest case.

`--quality` (optional, minutes): trains `cd` and `cd+autocdsr` with several update_every values (and, with
`--quality-ib-tokens`, `cd+autocdsr_plus` with several T; with `--quality-start-after`, `cd+autocdsr` with
Pareto weights only after N steps of L_rec alone; with `--quality-variant`, any method with any config
overrides) through `train_worker` on generated data and reports validation and test NDCG@10 (overall and
per target domain) and the final a_cd per setting. `--quality-only` skips the step timing.

The last line printed is one JSON object (ratios; keys `autocdsr_over_cd`, `autocdsr_plus_over_cd` at the
recommended update_every, `autocdsr_every_step_over_cd` at update_every = 1, per backbone and shape).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr.config import METHODS  # noqa: E402
from autocdsr.data import batching  # noqa: E402
from autocdsr.models import build_model  # noqa: E402
from autocdsr.models.config import ModelConfig  # noqa: E402
from autocdsr.models.ib import PLAN_KEY  # noqa: E402
from autocdsr.objectives.balancer import BalancerConfig, LossBalancer  # noqa: E402
from autocdsr.synth import DEFAULT_DOMAINS  # noqa: E402

PLANNED = "cd+autocdsr_plus reuse step, plan from the data path"
# The update_every this benchmark reports as `autocdsr_over_cd` (see docs/benchmarks.md for the evidence).
RECOMMENDED_UPDATE_EVERY = 10
MASK_PROB = 0.2
# wall: elapsed time (what a user waits for); cpu: this process's CPU time, which other processes'
# load barely changes (use it with --threads 1 on a shared machine: with 2 threads it also counts spinning).
CLOCKS = {
    "wall": time.perf_counter,
    "cpu": time.process_time,
}  # BERT4Rec cloze masking, as ModelSection.mask_prob


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        b, _, l_ = text.lower().partition("x")
        return cls(int(b), int(l_))

    def __str__(self) -> str:
        return f"{self.batch}x{self.length}"


def item_domain_table() -> np.ndarray:
    """[num_items + 1] domain_idx per item_idx: each domain's items in one contiguous range, as the builder."""
    parts = [np.zeros(1, dtype=np.int64)]
    parts += [np.full(d.n_items, k + 1, dtype=np.int64) for k, d in enumerate(DEFAULT_DOMAINS)]
    return np.concatenate(parts)


def make_sequences(
    n: int, length: int, stickiness: float, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` sequences of ``length`` events: (item_idx arrays, domain_idx arrays), synth-like (module doc)."""
    shares = np.array([d.share for d in DEFAULT_DOMAINS])
    shares = shares / shares.sum()
    first = np.cumsum([1] + [d.n_items for d in DEFAULT_DOMAINS[:-1]])
    popularity = []
    for d in DEFAULT_DOMAINS:
        w = 1.0 / np.arange(1, d.n_items + 1) ** 1.05
        popularity.append(w / w.sum())
    items, domains = [], []
    for _ in range(n):
        affinity = rng.dirichlet(shares * 1.5 * len(shares))
        fresh = rng.choice(len(shares), size=length, p=affinity)
        stay = rng.random(length) < stickiness
        dom = np.empty(length, dtype=np.int64)
        dom[0] = fresh[0]
        for t in range(1, length):
            dom[t] = dom[t - 1] if stay[t] else fresh[t]
        item = np.empty(length, dtype=np.int64)
        for k, d in enumerate(DEFAULT_DOMAINS):
            at = dom == k
            item[at] = first[k] + rng.choice(d.n_items, size=int(at.sum()), p=popularity[k])
        items.append(item)
        domains.append(dom + 1)
    return items, domains


def make_batches(
    backbone: str, shape: Shape, count: int, stickiness: float, seed: int
) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    num_items = int(sum(d.n_items for d in DEFAULT_DOMAINS))
    out = []
    for _ in range(count):
        # SASRec needs one more event than positions (the last position's target)
        items, doms = make_sequences(shape.batch, shape.length + (backbone == "sasrec"), stickiness, rng)
        if backbone == "sasrec":
            out.append(batching.sasrec_batch(items, doms, shape.length))
        else:
            out.append(batching.cloze_batch(items, doms, shape.length, MASK_PROB, num_items + 1, rng))
    return out


def mean_run_length(batch: dict[str, torch.Tensor]) -> float:
    dom = batch["domain_idx"]
    valid = dom != 0
    changes = (dom[:, 1:] != dom[:, :-1]) & valid[:, 1:] & valid[:, :-1]
    runs = int(changes.sum()) + int(valid.any(dim=1).sum())
    return float(valid.sum()) / max(runs, 1)


class Variant:
    """One method's model, optimizer and balancer, stepping exactly as `train_worker` does.

    ``reuse_only``: after the first (solve) step the Pareto weights are never re-solved, so every timed
    step is a reuse step (update_every = ∞); with update_every = 1 every timed step is a solve step.
    """

    def __init__(
        self,
        name: str,
        model_cfg: ModelConfig,
        balancer: BalancerConfig,
        seed: int,
        device: torch.device | str = "cpu",
        planned: bool = False,
    ) -> None:
        self.name = name
        self.planned = planned  # steps on the batches that carry their packing plan
        torch.manual_seed(seed)
        self.model = build_model(model_cfg, item_domain_table()).to(device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        self.balancer = LossBalancer(balancer)
        self.need_a_cd = balancer.method != "cd"
        self.shared = list(self.model.shared_parameters())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_count = 0
        self.times: list[float] = []

    def step(self, batch: dict[str, torch.Tensor], clock, amp: bool = False) -> float:
        start = clock()
        self.step_count += 1
        self.optimizer.zero_grad(set_to_none=True)
        device = next(self.model.parameters()).device
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):  # as train_worker's step
            out = self.model(batch, need_a_cd=self.need_a_cd)
        info = self.balancer.backward(out.loss_rec, out.a_cd, self.shared, self.params, self.step_count)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if not (math.isfinite(info.loss_rec) and torch.isfinite(grad_norm)):  # the trainer's host sync
            raise RuntimeError(f"{self.name}: non-finite loss at step {self.step_count}")
        self.optimizer.step()
        return clock() - start


def variants_for(backbone: str, length: int, args: argparse.Namespace) -> list[Variant]:
    num_items = int(sum(d.n_items for d in DEFAULT_DOMAINS))

    def cfg(ib: bool) -> ModelConfig:
        return ModelConfig(
            backbone=backbone,
            num_items=num_items,
            num_domains=len(DEFAULT_DOMAINS),
            max_len=length,
            d_model=args.d_model,
            n_layers=args.layers,
            n_heads=args.heads,
            ib=ib,
            num_ib_tokens=args.ib_tokens,
            ib_bucket_ratio=args.ib_bucket_ratio,
            ib_short_row=args.ib_short_row,
        )

    solve, reuse = BalancerConfig("autocdsr", update_every=1), BalancerConfig("autocdsr", update_every=10**9)
    dev = args.device
    return [
        Variant("cd", cfg(False), BalancerConfig(method="cd"), seed=0, device=dev),
        Variant("cd+autocdsr solve", cfg(False), solve, seed=0, device=dev),
        Variant("cd+autocdsr reuse", cfg(False), reuse, seed=0, device=dev),
        Variant("cd+autocdsr_plus solve", cfg(True), solve, seed=0, device=dev),
        Variant("cd+autocdsr_plus reuse", cfg(True), reuse, seed=0, device=dev),
        Variant(PLANNED, cfg(True), reuse, seed=0, device=dev, planned=True),
    ]


def amortised(solve: float, reuse: float, every: int) -> float:
    """Mean step time with one solve step every ``every`` steps and reuse steps in between."""
    return (solve + (every - 1) * reuse) / every


def step_clock(args: argparse.Namespace):
    """The clock a step is timed with. On an accelerator: wall time after waiting for its queued work (a
    step's kernels run asynchronously, so an unsynchronised clock would time the launches only)."""
    if torch.device(args.device).type == "cpu":
        return CLOCKS[args.clock]
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else lambda: None

    def clock() -> float:
        sync()
        return time.perf_counter()

    return clock


def bench_one(backbone: str, shape: Shape, args: argparse.Namespace) -> dict[str, float]:
    """Rounds of one step per variant (A B C D E A B C D E ...); ratios to `cd` per round, then medians."""
    host = make_batches(backbone, shape, args.batches, args.stickiness, seed=1)
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in host]
    # the same batches with their packing plan, built from the host arrays as the data path does
    plans = [
        batching.layout_plan(
            b, backbone, len(DEFAULT_DOMAINS), args.ib_tokens, args.ib_bucket_ratio, args.ib_short_row
        )
        for b in host
    ]
    planned = [{**b, PLAN_KEY: plan} for b, plan in zip(batches, plans, strict=True)]
    variants = variants_for(backbone, shape.length, args)
    clock = step_clock(args)
    rounds = []
    for r in range(args.warmup + args.rounds):
        batch, with_plan = batches[r % len(batches)], planned[r % len(batches)]
        # rotate the order every round: no variant always runs first (cold caches) or after the same one
        k = r % len(variants)
        order = variants[k:] + variants[:k]
        times = {v.name: v.step(with_plan if v.planned else batch, clock, args.amp) for v in order}
        if r >= args.warmup:
            rounds.append(times)
    cd = [t["cd"] for t in rounds]
    result: dict[str, float] = {"run_length": mean_run_length(batches[0]), "cd_s": statistics.median(cd)}
    rows = [("cd", cd, cd)]
    for method in ("cd+autocdsr", "cd+autocdsr_plus"):
        solve = [t[f"{method} solve"] for t in rounds]
        reuse = [t[f"{method} reuse"] for t in rounds]
        rows += [(f"{method} solve step", solve, None), (f"{method} reuse step", reuse, None)]
        for n in args.update_every:
            if n == 1:  # every step is a solve step: the row above
                continue
            rows.append(
                (
                    f"{method}, update_every={n}",
                    [amortised(s, u, n) for s, u in zip(solve, reuse, strict=True)],
                    n,
                )
            )
    rows.append((PLANNED, [t[PLANNED] for t in rounds], None))
    print(
        f"\n{backbone} {shape} (mean domain run {result['run_length']:.1f} events; "
        f"{args.rounds} rounds after {args.warmup} warm-up)"
    )
    print(f"  {'variant':<54}{'median s/step':>14}{'it/s':>9}{'ratio to cd':>13}{'ratio IQR':>17}")
    for name, times, _ in rows:
        ratios = sorted(t / c for t, c in zip(times, cd, strict=True))
        q1, q3 = np.quantile(ratios, [0.25, 0.75])
        ratio = statistics.median(ratios)
        result[name] = ratio
        med = statistics.median(times)
        print(f"  {name:<54}{med:>14.4f}{1 / med:>9.2f}{ratio:>13.3f}{f'{q1:.3f}-{q3:.3f}':>17}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python bench/step_time.py",
        description="Step time of cd, cd+autocdsr and cd+autocdsr_plus (both backbones), as ratios to cd.",
    )
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer rounds: under two minutes")
    p.add_argument("--shapes", nargs="+", type=Shape.parse, help="BATCHxLENGTH (default 16x800 128x200)")
    p.add_argument("--backbones", nargs="+", default=["sasrec", "bert4rec"], choices=["sasrec", "bert4rec"])
    p.add_argument(
        "--update-every",
        nargs="+",
        type=int,
        default=[RECOMMENDED_UPDATE_EVERY, 1, 50],
        help="Pareto re-solve periods to report; the first is the one reported as autocdsr_over_cd "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--rounds", type=int, help="timed rounds, one step of every variant each (default 30, --quick 8)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default %(default)s)")
    p.add_argument(
        "--batches", type=int, default=3, help="distinct batches cycled through (default %(default)s)"
    )
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--ib-tokens",
        type=int,
        default=ModelConfig.num_ib_tokens,
        help="AutoCDSR⁺ IB tokens T per domain (causal: per domain run) (default %(default)s)",
    )
    p.add_argument(
        "--ib-bucket-ratio",
        type=float,
        default=ModelConfig.ib_bucket_ratio,
        help="AutoCDSR⁺ packed rows within this factor of a bucket's longest share one attention call "
        "(model.ib_bucket_ratio; default %(default).3f, the CPU's optimum; a GPU may prefer 2 or more)",
    )
    p.add_argument(
        "--ib-short-row",
        type=int,
        default=ModelConfig.ib_short_row,
        help="AutoCDSR⁺ packed rows of at most this many tokens share one call (model.ib_short_row; "
        "default %(default)s)",
    )
    p.add_argument(
        "--stickiness", type=float, default=0.7, help="P(an event stays in the previous event's domain)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s, see --clock)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="what a step's time is on the CPU (default cpu); on an accelerator always synchronised wall time",
    )
    p.add_argument(
        "--device", default="cpu", help="torch device the models and batches live on, e.g. cuda (default cpu)"
    )
    p.add_argument(
        "--amp",
        action="store_true",
        help="bf16 autocast around the forward pass, as train.mixed_precision does on a GPU",
    )
    p.add_argument("--quality", action="store_true", help="also run the update_every quality comparison")
    p.add_argument("--quality-steps", type=int, default=600, help="training steps per --quality run")
    p.add_argument("--quality-seeds", type=int, nargs="+", default=[0, 1], help="seeds per --quality setting")
    p.add_argument(
        "--quality-ib-tokens",
        type=int,
        nargs="*",
        default=[],
        metavar="T",
        help="--quality also trains cd+autocdsr_plus with each of these T (at the first --update-every)",
    )
    p.add_argument(
        "--quality-start-after",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="--quality also trains cd+autocdsr with autocdsr.start_after=N (at the first --update-every)",
    )
    p.add_argument(
        "--quality-variant",
        nargs="*",
        default=[],
        metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
        help="--quality also trains METHOD with these config overrides, e.g. "
        "cd+autocdsr:autocdsr.pareto.include_task_gradients=true",
    )
    p.add_argument("--quality-only", action="store_true", help="--quality without the step timing")
    p.add_argument(
        "--data",
        type=Path,
        default=REPO / "data/quickstart/sequences",
        help="built sequences for --quality (default: %(default)s, from `make quickstart`)",
    )
    args = p.parse_args(argv)
    args.quality |= args.quality_only
    args.variants = []  # (name, method, overrides) of every --quality-variant
    for variant in args.quality_variant:
        method, _, joined = variant.partition(":")
        overrides = [o for o in joined.split(",") if o]
        if method not in METHODS or not all("=" in o for o in overrides):
            p.error(
                f"--quality-variant {variant!r}: expected METHOD:KEY=VALUE[,KEY=VALUE], METHOD in {METHODS}"
            )
        args.variants.append((variant, method, overrides))
    if args.shapes is None:
        args.shapes = [Shape(8, 200), Shape(32, 50)] if args.quick else [Shape(16, 800), Shape(128, 200)]
    if args.rounds is None:
        args.rounds = 8 if args.quick else 30
    torch.set_num_threads(args.threads)
    on_cpu = torch.device(args.device).type == "cpu"
    if not on_cpu and (args.quality or args.quality_only):
        p.error("--quality trains through train_worker on the CPU; run it without --device")
    accelerator = (
        f", {torch.cuda.get_device_name(args.device)}" if torch.device(args.device).type == "cuda" else ""
    )
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); device {args.device}{accelerator}"
        f"{', bf16 autocast' if args.amp else ''}; d={args.d_model}, "
        f"{args.layers} layers, {args.heads} heads, {sum(d.n_items for d in DEFAULT_DOMAINS)} items, "
        f"{args.clock if on_cpu else 'synchronised wall'} clock"
    )
    first = args.update_every[0]
    summary: dict[str, float] = {}
    for shape in [] if args.quality_only else args.shapes:
        for backbone in args.backbones:
            r = bench_one(backbone, shape, args)
            key = f"{backbone}_{shape}"
            at = "solve step" if first == 1 else f", update_every={first}"
            summary[f"{key}/autocdsr_over_cd"] = r[f"cd+autocdsr {at}".replace(" ,", ",")]
            summary[f"{key}/autocdsr_plus_over_cd"] = r[f"cd+autocdsr_plus {at}".replace(" ,", ",")]
            summary[f"{key}/autocdsr_every_step_over_cd"] = r["cd+autocdsr solve step"]
            summary[f"{key}/autocdsr_plus_every_step_over_cd"] = r["cd+autocdsr_plus solve step"]
            summary[f"{key}/autocdsr_plus_reuse_over_cd"] = r["cd+autocdsr_plus reuse step"]
            summary[f"{key}/autocdsr_plus_reuse_data_plan_over_cd"] = r[PLANNED]
            summary[f"{key}/cd_s_per_step"] = r["cd_s"]
    quality = run_quality(args) if args.quality else None

    # Headline keys: the worst case over the backbones and shapes measured.
    def worst(suffix: str) -> float:
        return max(v for k, v in summary.items() if k.endswith("/" + suffix))

    result: dict[str, object] = {
        "autocdsr_update_every": first,
        "ib_bucket_ratio": args.ib_bucket_ratio,
        "ib_short_row": args.ib_short_row,
    }
    if summary:
        result |= {
            "autocdsr_over_cd": worst("autocdsr_over_cd"),
            "autocdsr_plus_over_cd": worst("autocdsr_plus_over_cd"),
            "autocdsr_every_step_over_cd": worst("autocdsr_every_step_over_cd"),
            "autocdsr_plus_every_step_over_cd": worst("autocdsr_plus_every_step_over_cd"),
            **summary,
        }
    if quality is not None:
        result["quality"] = quality
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


def run_quality(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train `cd`, `cd+autocdsr` at every --update-every (and `cd+autocdsr_plus` at every --quality-ib-tokens)
    through `train_worker` on built sequences.

    Same data, model shape, seeds and batches for every setting; reports the mean over seeds of the best
    validation NDCG@10, test NDCG@10, the last-30-steps a_cd and the training time (CPU clock).
    """
    from autocdsr.config import load_train_config
    from autocdsr.data import shards
    from autocdsr.data.memory import in_memory_batches
    from autocdsr.training import LocalContext, train_worker

    if not (args.data / "_SUCCESS").exists():
        raise SystemExit(
            f"--quality needs built sequences at {args.data} (run `make quickstart` or pass --data)"
        )
    info = shards.open_dataset(str(args.data))
    # (name, method, overrides)
    first = args.update_every[0]
    settings: list[tuple[str, str, list[str]]] = [("cd", "cd", [])]
    settings += [
        (f"cd+autocdsr/update_every={n}", "cd+autocdsr", [f"autocdsr.update_every={n}"])
        for n in args.update_every
    ]
    settings += [
        (
            f"cd+autocdsr_plus/update_every={first}/T={t}",
            "cd+autocdsr_plus",
            [f"autocdsr.update_every={first}", f"model.num_ib_tokens={t}"],
        )
        for t in args.quality_ib_tokens
    ]
    settings += [
        (
            f"cd+autocdsr/update_every={first}/start_after={n}",
            "cd+autocdsr",
            [f"autocdsr.update_every={first}", f"autocdsr.start_after={n}"],
        )
        for n in args.quality_start_after
    ]
    settings += args.variants
    print(
        f"\nquality: {len(settings)} settings x seeds {args.quality_seeds}, {args.quality_steps} steps each"
    )
    out: dict[str, dict[str, float]] = {}
    for name, method, extra in settings:
        rows, per_domain = [], []
        for seed in args.quality_seeds:
            overrides = [
                "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "data.max_len=50",
                "train.batch_size=64", "train.lr=0.003", "train.warmup_steps=50",
                f"train.max_steps={args.quality_steps}", f"train.eval_every={args.quality_steps // 4}",
                "train.patience=100000", "eval.num_negatives=100", f"method={method}", f"seed={seed}",
                *extra,
            ]  # fmt: skip
            cfg = load_train_config(None, overrides)
            logged: list[dict[str, float]] = []
            start = time.process_time()
            final = train_worker(
                cfg,
                info,
                LocalContext(in_memory_batches(info, cfg)),
                lambda m, _s, logged=logged: logged.append(m),
            )
            seconds = time.process_time() - start
            a_cd = [m["train/a_cd"] for m in logged if "train/a_cd" in m]
            rows.append(
                (final["val/best_ndcg_10"], final["test/ndcg_10/all"], float(np.mean(a_cd[-30:])), seconds)
            )
            per_domain.append({d: final.get(f"test/ndcg_10/{d}", math.nan) for d in info.vocab.domains})
        val, test, a_cd, secs = (float(np.mean(c)) for c in zip(*rows, strict=True))
        spread = float(np.std([r[1] for r in rows]))
        domains = {d: float(np.mean([p[d] for p in per_domain])) for d in info.vocab.domains}
        out[name] = {
            "val_ndcg_10": val,
            "test_ndcg_10": test,
            "test_ndcg_10_sd": spread,
            "a_cd_end": a_cd,
            "cpu_s": secs,
            **{f"test_ndcg_10/{d}": v for d, v in domains.items()},
        }
        print(
            f"  {name:<34} val N@10 {val:.4f}  test N@10 {test:.4f} (sd {spread:.4f})  "
            f"a_cd end {a_cd:.3f}  {secs:.0f} s CPU\n    test N@10 by domain: "
            + "  ".join(f"{d} {v:.4f}" for d, v in domains.items()),
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
