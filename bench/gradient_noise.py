"""How much of a minibatch gradient is sampling noise, per task, and what that does to the Pareto weights.

    python bench/gradient_noise.py --data SEQUENCES --config conf/train/kuairand1k-bert4rec.yaml \\
        --set data.max_len=50 train.batch_size=64 model.num_sampled=4096 train.warmup_steps=200 \\
        --at 0 20 60 200 500

Trains `cd` from its initial weights (the config's optimizer, schedule and batches) and, at each step of
``--at``, computes ∇L_rec and ∇a_cd over the shared (non-embedding) parameters, as a solve step does, on
``--batches`` fixed probe batches of the train split (train mode: dropout and the cloze masks as in
training). Per task it reports the share of the minibatch gradient's squared norm that is noise,
1 − ‖μ‖² / E‖g‖², with ‖μ‖² estimated without bias from the probe batches (‖ḡ‖² − s²/N), and the weight
the paper's in-band rule (Eq. 9: the min-norm point of the two normalised task gradients) puts on L̃_cd (a
solve's `train/pareto/normalised_alpha2`), computed three ways: on single batches (what the balancer sees;
median and range), on the mean of the N batches, and on the unbiased estimate of the expected gradients'
Gram matrix (what `autocdsr.noise_correction` approximates during training). The losses are normalised by
their values at the first ``--at`` step, as `autocdsr.normalisation=initial` does. The last line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr.config import load_train_config  # noqa: E402
from autocdsr.data import shards  # noqa: E402
from autocdsr.data.memory import in_memory_batches  # noqa: E402
from autocdsr.models import build_model  # noqa: E402
from autocdsr.objectives.balancer import NoiseEstimate  # noqa: E402
from autocdsr.objectives.pareto import min_norm_segment  # noqa: E402
from autocdsr.training import lr_lambda, seed_everything  # noqa: E402


def weight_on_cd(rr: float, rc: float, cc: float) -> float:
    """Eq. 9 (`pareto.min_norm_segment`, a = the L_rec gradient): the min-norm point's weight on a_cd's."""
    return 1.0 - min_norm_segment(rr, rc, cc)[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/gradient_noise.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="built sequences (jobs/build_sequences.py output)")
    p.add_argument("--config", default=None, help="training config (default: the built-in defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--at", nargs="+", type=int, default=[0, 200], help="training steps to measure at")
    p.add_argument("--batches", type=int, default=16, help="probe batches per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    if args.at != sorted(args.at) or args.at[0] < 0:
        p.error("--at: steps must be ascending and >= 0")
    if args.batches < 2:
        p.error("--batches must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_train_config(args.config, ["method=cd", *args.set])
    info = shards.open_dataset(args.data)
    vocab = info.vocab
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains), vocab.item_domain, vocab.item_count
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, cfg.train.max_steps)
    )
    shared = list(model.shared_parameters())
    train = in_memory_batches(info, cfg)(0)
    probe_iter = in_memory_batches(info, cfg)(1_000_003)  # another permutation than training's passes
    probes = [next(probe_iter) for _ in range(args.batches)]

    def flat(grads: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        return torch.cat(
            [
                (g if g is not None else torch.zeros_like(p)).reshape(-1)
                for g, p in zip(grads, shared, strict=True)
            ]
        )

    rows = []
    refs: tuple[float, float] | None = None
    step = 0
    for target in args.at:
        while step < target:
            model.train()
            optimizer.zero_grad(set_to_none=True)
            model(next(train)).loss_rec.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf)
            optimizer.step()
            schedule.step()
            step += 1
        model.train()
        rec, cd, losses = [], [], []
        for batch in probes:
            out = model(batch)
            rec.append(flat(torch.autograd.grad(out.loss_rec, shared, retain_graph=True, allow_unused=True)))
            cd.append(flat(torch.autograd.grad(out.a_cd, shared, allow_unused=True)))
            losses.append((float(out.loss_rec.detach()), float(out.a_cd.detach())))
        R, C = torch.stack(rec).double(), torch.stack(cd).double()
        n = len(probes)
        loss_rec, a_cd = (sum(v) / n for v in zip(*losses, strict=True))
        refs = refs or (loss_rec, a_cd)
        R, C = R / refs[0], C / refs[1]  # normalised task gradients ∇L̃_i
        r_mean, c_mean = R.mean(0), C.mean(0)
        # unbiased Gram of the expected gradients: mean-gradient dots minus (co)variance / N
        rr_cov = float(((R - r_mean) * (R - r_mean)).sum(1).sum()) / (n - 1)
        cc_cov = float(((C - c_mean) * (C - c_mean)).sum(1).sum()) / (n - 1)
        rc_cov = float(((R - r_mean) * (C - c_mean)).sum(1).sum()) / (n - 1)
        rr_m, rc_m, cc_m = float(r_mean @ r_mean), float(r_mean @ c_mean), float(c_mean @ c_mean)
        rr_u, rc_u, cc_u = rr_m - rr_cov / n, rc_m - rc_cov / n, cc_m - cc_cov / n
        floor = NoiseEstimate.FLOOR  # the same floor as the in-training correction
        single = sorted(
            weight_on_cd(float(R[i] @ R[i]), float(R[i] @ C[i]), float(C[i] @ C[i])) for i in range(n)
        )
        rr_single, cc_single = float((R * R).sum(1).mean()), float((C * C).sum(1).mean())
        row = {
            "step": step,
            "loss_rec": loss_rec,
            "a_cd": a_cd,
            "noise_share_rec": 1.0 - max(rr_u, 0.0) / rr_single,
            "noise_share_cd": 1.0 - max(cc_u, 0.0) / cc_single,
            "alpha2_single_median": single[n // 2],
            "alpha2_single_min": single[0],
            "alpha2_single_max": single[-1],
            "alpha2_mean_gradients": weight_on_cd(rr_m, rc_m, cc_m),
            "alpha2_expected_gradients": weight_on_cd(max(rr_u, floor * rr_m), rc_u, max(cc_u, floor * cc_m)),
        }
        rows.append(row)
        print(
            f"step {step:>5}: L_rec {loss_rec:6.2f}  a_cd {a_cd:.3f}  noise share of |g|^2: rec "
            f"{row['noise_share_rec']:.3f}, a_cd {row['noise_share_cd']:.3f}  |  Eq. 9 weight on a_cd: one batch "
            f"{row['alpha2_single_median']:.3f} [{row['alpha2_single_min']:.3f}..{row['alpha2_single_max']:.3f}], "
            f"mean of {n} {row['alpha2_mean_gradients']:.3f}, expected gradients "
            f"{row['alpha2_expected_gradients']:.3f}",
            flush=True,
        )
    print(json.dumps({"backbone": cfg.model.backbone, "batch_size": cfg.train.batch_size, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
