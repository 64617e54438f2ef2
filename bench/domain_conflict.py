"""Which domains' cross-domain attention does the recommendation loss want kept? Per-domain gradient conflict.

    python bench/domain_conflict.py --data SEQUENCES --config conf/train/kuairand1k-sasrec.yaml \\
        --set data.max_len=50 train.batch_size=64 model.num_sampled=4096 \\
        --checkpoint RUN/checkpoints/sasrec-cd-seed0 --batches 128

AutoCDSR lowers one scalar, a_cd (Eq. 5: cross-domain attention mass averaged over every query row), with one
weight per step. This asks, for a trained full-attention model, whether that is the right granularity. It
splits both objectives by domain: L_rec^(t) is Eq. 4 over the target positions whose target is in domain t,
a_cd^(q) is Eq. 5 over the query rows of domain q (the model's own notion of a row's domain,
`ModelConfig.cd_query_domain`; a_cd = Σ_q n_q a_cd^(q) / n). On ``--batches`` probe batches of the train split
(train mode, as a solve step sees them) it takes the gradient of each over the shared (non-embedding)
parameters, the θ of Eq. 8-12, and estimates, without the same-batch bias, the dot products of the expected
gradients: u(t, q) = E[∇L_rec^(t)] · E[∇a_cd^(q)] = (S_t · S_q − Σ_i g_t,i · g_q,i) / (N (N − 1)) over
independent batches i.

Reported per pair: ``effect`` = u(t, q) / u(q, q), the first-order change of L_rec^(t) per unit decrease of
a_cd^(q) along a_cd^(q)'s own steepest descent. Positive: lowering domain q's cross-domain attention also
lowers domain t's loss (the objectives agree); negative: it raises it (cross-domain attention from q helps t,
and AutoCDSR's a_cd objective works against the recommendation there). With a jackknife standard error over
the batches. The pooled row and column (t = all, q = all) are what the paper's solver sees.

The weights come from a checkpoint folder that `autocdsr.train` / `bench/reproduce.py` wrote (``--weights
best``: the model that was tested; ``last``: the final step's); the config must describe the same model.
Without ``--checkpoint`` the model keeps its initial weights (for a smoke test). SASRec with full attention
(`cd`, `cd+autocdsr`, `cd+fixed` models). The last line is one JSON object.

``--heldout-batch N`` adds the same table for held-out targets: L_rec^(t) over the last item of ``valid``
sequences (the leave-one-out validation target, which training never predicts), N sequences per probe batch,
against the same a_cd^(q) of the train probe batches (key ``heldout_pairs``). ``--heldout-split train`` is its
control: the last item of each ``train`` sequence, the same last position with an item training predicts.
Where the held-out table disagrees with both, the training gradient says something about the training
targets that does not carry to unseen ones (the held-out gate, `autocdsr.objectives.gate`, acts on that).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr.config import load_train_config  # noqa: E402
from autocdsr.data import shards  # noqa: E402
from autocdsr.data.memory import in_memory_batches  # noqa: E402
from autocdsr.models import build_model  # noqa: E402
from autocdsr.models.attention import cross_mass_per_row  # noqa: E402
from autocdsr.objectives.gate import flat_grad, heldout_batch, unbiased_dots  # noqa: E402
from autocdsr.training import CHECKPOINT_FILE, load_best_state, seed_everything  # noqa: E402

log = logging.getLogger("bench.domain_conflict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/domain_conflict.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="built sequences (jobs/build_sequences.py output)")
    p.add_argument("--config", default=None, help="training config (default: the built-in defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder of a run (default: initial weights)")
    p.add_argument(
        "--weights", choices=("best", "last"), default="best", help="which weights of the checkpoint"
    )
    p.add_argument("--batches", type=int, default=32, help="probe batches (independent; >= 3)")
    p.add_argument("--probe-seed", type=int, default=1_000_003, help="epoch seed of the probe batches' order")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--heldout-batch",
        type=int,
        default=0,
        help="also L_rec on held-out (valid split) targets, this many sequences per probe batch (0: off)",
    )
    p.add_argument(
        "--heldout-split",
        choices=("valid", "train"),
        default="valid",
        help="whose last items --heldout-batch targets: valid (held out) or train (a control: the same last "
        "position, an item training predicts)",
    )
    args = p.parse_args(argv)
    if args.batches < 3:
        p.error("--batches must be >= 3 (the jackknife leaves one out of an unbiased pair estimate)")
    return args


def load_weights(model: torch.nn.Module, folder: str, which: str) -> None:
    if which == "best":
        model.load_state_dict(load_best_state(folder))
        return
    path = Path(folder) / CHECKPOINT_FILE
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])


def per_domain_objectives(
    model, batch: dict, num_domains: int
) -> tuple[list[torch.Tensor | None], list[int]]:
    """[L_rec^(1..D), L_rec, a_cd^(1..D), a_cd] of one batch (None where the batch has no such position), and
    the number of target positions and query rows behind each (same order)."""
    cfg = model.cfg
    if cfg.backbone != "sasrec" or cfg.ib:
        raise SystemExit(
            "bench/domain_conflict.py: SASRec with full attention only (cd / cd+autocdsr models)"
        )
    out = model._encode_batch(batch, need_a_cd=True, return_maps=True)
    targets, target_domain = batch["target_idx"], batch["target_domain"]
    item_domain, valid = batch["domain_idx"], batch["item_idx"] != 0
    own = model.query_domain(batch)
    own = item_domain if own is None else own
    losses: list[torch.Tensor | None] = []
    counts: list[int] = []
    for t in [*range(1, num_domains + 1), None]:
        rows = (targets != 0) & (target_domain == t if t is not None else True)
        n = int(rows.sum())
        losses.append(model.rec_loss(out.hidden[rows], targets[rows]) if n else None)
        counts.append(n)
    # a_cd^(q): Eq. 5 over domain q's rows (a_cd, the last entry: over all valid rows)
    per_row = cross_mass_per_row(out.maps, item_domain, valid, own)
    masses: list[torch.Tensor | None] = []
    for q in [*range(1, num_domains + 1), None]:
        rows = valid & (own == q) if q is not None else valid
        n = int(rows.sum())
        masses.append(per_row[rows].mean() if n else None)
        counts.append(n)
    if cfg.cd_query_weights is None and cfg.cd_query_average == "rows":  # fused a_cd is Eq. 5 as written
        torch.testing.assert_close(masses[-1].detach(), out.a_cd.detach(), rtol=1e-4, atol=1e-6)
    return losses + masses, counts


def heldout_batches(
    info: shards.DatasetInfo, max_len: int, size: int, seed: int, split: str = "valid"
) -> Iterator[dict]:
    """``split``'s sequences in a seeded order as batches whose only target is each one's last item (for
    ``valid``: the held-out item; for ``train``: the last item training predicts, the position control)."""
    table = pa.concat_tables(
        pq.read_table(f, columns=["item_idx", "domain_idx"]) for f in shards.list_split_files(info, split)
    )
    items = shards.list_arrays(table.column("item_idx"))
    domains = shards.list_arrays(table.column("domain_idx"))
    order = np.random.default_rng(seed).permutation(len(items))
    for start in range(0, len(order) - size + 1, size):
        idx = order[start : start + size]
        yield heldout_batch([items[i] for i in idx], [domains[i] for i in idx], max_len)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_train_config(args.config, ["method=cd", *args.set])
    info = shards.open_dataset(args.data)
    vocab = info.vocab
    seed_everything(cfg.seed)
    model = build_model(
        cfg.model_config(vocab.num_items, vocab.num_domains, vocab.domains),
        vocab.item_domain,
        vocab.item_count,
    )
    if args.checkpoint:
        load_weights(model, args.checkpoint, args.weights)
    model.train()  # dropout as in training: the gradients a solve step sees
    shared = list(model.shared_parameters())
    names = [*vocab.domains, "all"]
    D = vocab.num_domains
    probe_iter = in_memory_batches(info, cfg)(args.probe_seed)
    held_iter = (
        heldout_batches(info, cfg.data.max_len, args.heldout_batch, args.probe_seed, args.heldout_split)
        if args.heldout_batch
        else None
    )
    K = 2 * (D + 1)  # objectives per probe batch: L_rec^(t), a_cd^(q); then held-out L_rec^(t) if asked
    grads, values, counts = [], [], []
    for i in range(args.batches):
        batch = next(probe_iter)
        objectives, n = per_domain_objectives(model, batch, D)
        if held_iter is not None:
            held, n_held = per_domain_objectives(model, next(held_iter), D)
            objectives, n = objectives + held[: D + 1], n + n_held[: D + 1]
        if any(o is None for o in objectives):
            kinds = ["rec", "cd", "heldout rec"]
            missing = [
                f"{kinds[j // (D + 1)]}/{names[j % (D + 1)]}" for j, o in enumerate(objectives) if o is None
            ]
            raise SystemExit(f"probe batch {i} has no position for {missing}: use larger batches")
        rows = []
        for j, obj in enumerate(objectives):
            rows.append(flat_grad(obj, shared, retain=j < len(objectives) - 1))
        grads.append(torch.stack(rows))
        values.append([float(o.detach()) for o in objectives])
        counts.append(n)
        log.info("probe batch %d/%d", i + 1, args.batches)
    g = torch.stack(grads)  # [N, objectives, P]
    u, se = unbiased_dots(g)
    cd = list(range(D + 1, K))
    mean = [sum(v[j] for v in values) / len(values) for j in range(g.shape[1])]
    share = [sum(c[j] for c in counts) for j in range(g.shape[1])]

    def table(rec: list[int], title: str) -> list[dict]:
        pairs = []
        print(f"effect on {title} per unit decrease of a_cd^(q) (± jackknife SE), {args.batches} batches:")
        print(f"{'target t / query q':>20} " + " ".join(f"{names[q - D - 1]:>18}" for q in cd))
        for t in rec:
            cells = []
            for q in cd:
                effect, err = float(u[t, q] / u[q, q]), float(se[t, q])
                pairs.append(
                    {"target": names[t % (D + 1)], "query": names[q - D - 1], "effect": effect, "se": err}
                )
                cells.append(f"{effect:+9.3f} ± {err:6.3f}")
            print(f"{names[t % (D + 1)]:>20} " + " ".join(cells))
        return pairs

    result = {
        "checkpoint": args.checkpoint,
        "weights": args.weights if args.checkpoint else "initial",
        "batches": args.batches,
        "cd_query_domain": cfg.model.cd_query_domain,
        "domains": names,
        "loss_rec": dict(zip(names, mean[: D + 1], strict=True)),
        "a_cd": dict(zip(names, mean[D + 1 : K], strict=True)),
        "target_positions": dict(zip(names, share[: D + 1], strict=True)),
        "query_rows": dict(zip(names, share[D + 1 : K], strict=True)),
        "cd_grad_norm_sq": {names[q - D - 1]: float(u[q, q]) for q in cd},
        "pairs": table(list(range(D + 1)), "L_rec^(t) (train targets)"),
    }
    if held_iter is not None:
        result["heldout_loss_rec"] = dict(zip(names, mean[K:], strict=True))
        result["heldout_targets"] = dict(zip(names, share[K:], strict=True))
        result["heldout_pairs"] = table(list(range(K, K + D + 1)), "held-out L_rec^(t) (valid targets)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
