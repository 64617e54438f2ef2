"""Where a trained model's attention goes, by domain pair (the paper's cross-domain attention analysis).

``domain_pair_attention`` runs a full-attention model (SASRec/BERT4Rec, with or without AutoCDSR) over
sequences of a split and returns a [D, D] matrix: row i, column j is the mean attention mass that a query
position of domain i puts on keys of domain j, averaged over valid query positions, heads and layers. Each
row sums to 1 (for domains that occur as queries); the off-diagonal mass of a row is that domain's share of
a_cd (Eq. 5). AutoCDSR⁺ models have no item-to-item cross-domain attention (their cross-domain path is the
IB tokens), so the matrix is not defined for them.

``domain_pair_figure`` draws it as a heatmap for MLflow (`plots/cross_domain_attention.png`).

Also here, for the result studies in bench/: the negative-transfer strata of the paper's Table 1 and their
rank-based counterparts (`transfer_groups`, `rank_groups`, `transfer_by_a_cd`; bench/reproduce.py), whole
rank distributions of test targets and their paired comparison (`rank_summary`, `paired_comparison`,
`popularity_ranks`; bench/rank_compare.py), and what the Pareto weights did over a run, phase by phase
(`weight_phases`; bench/weight_trace.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from autocdsr import evaluation
from autocdsr.data import batching
from autocdsr.data.shards import DatasetInfo, iter_eval_rows, list_arrays
from autocdsr.models.attention import cross_mass_per_row


@torch.no_grad()
def domain_pair_attention(
    model: torch.nn.Module,
    info: DatasetInfo,
    split: str = "valid",
    max_len: int = 50,
    max_sequences: int = 512,
    batch_size: int = 64,
) -> np.ndarray:
    """[D, D] mean attention mass from query domain i (row) to key domain j (column); NaN rows never occur."""
    D = info.vocab.num_domains
    mass = torch.zeros(D + 1, D + 1, dtype=torch.float64)
    queries = torch.zeros(D + 1, dtype=torch.float64)
    model.eval()
    seen = 0
    for rows in iter_eval_rows(info, split, 0, 1, batch_size, columns=("item_idx", "domain_idx")):
        items = list_arrays(rows.column("item_idx"))
        domains = list_arrays(rows.column("domain_idx"))
        keep = [i for i, s in enumerate(items) if len(s) >= 2][: max_sequences - seen]
        if not keep:
            continue
        batch = _analysis_batch(model, [items[i] for i in keep], [domains[i] for i in keep], max_len)
        add_domain_pair_mass(model.attention_maps(batch), batch["domain_idx"], mass, queries)
        seen += len(keep)
        if seen >= max_sequences:
            break
    out = (mass / queries.clamp_min(1)[:, None])[1:, 1:]
    out[queries[1:] == 0] = float("nan")
    return out.numpy()


def _analysis_batch(
    model: torch.nn.Module, items: list[np.ndarray], domains: list[np.ndarray], max_len: int
) -> dict[str, torch.Tensor]:
    """The history before each row's last item (the held-out target), as the model reads it in training
    (SASRec: with the next-domain tag of every position; BERT4Rec: items as they are, no mask)."""
    if model.cfg.backbone == "sasrec":
        return batching.sasrec_batch(items, domains, max_len)
    return batching.eval_batch(items, domains, max_len)


@torch.no_grad()
def per_sequence_a_cd(
    model: torch.nn.Module, info: DatasetInfo, split: str = "test", max_len: int = 50, batch_size: int = 64
) -> dict[str, float]:
    """a_cd (Eq. 5) of each sequence's input when its last item is predicted: sequence_id -> value.

    Normalised like the training a_cd: the attention mass a query puts on keys of another domain, averaged
    over the sequence's valid query positions, heads and layers (0 for a single-domain history). The
    per-example quantity of the paper's Figures 2-3. Full-attention models only (not AutoCDSR⁺). Eq. 5 as
    written (a query's own domain is its item's) whatever the model's ``cd_query_domain``, so that models
    trained either way are measured alike.
    """
    model.eval()
    out: dict[str, float] = {}
    for rows in iter_eval_rows(info, split, 0, 1, batch_size):
        sids = rows.column("sequence_id").to_pylist()
        items = list_arrays(rows.column("item_idx"))
        domains = list_arrays(rows.column("domain_idx"))
        keep = [i for i, s in enumerate(items) if len(s) >= 2]
        if not keep:
            continue
        batch = _analysis_batch(model, [items[i] for i in keep], [domains[i] for i in keep], max_len)
        per_row = per_row_a_cd(model.attention_maps(batch), batch["domain_idx"])
        out.update({sids[i]: float(v) for i, v in zip(keep, per_row.tolist(), strict=True)})
    return out


def per_row_a_cd(maps: list[torch.Tensor], domain_idx: torch.Tensor) -> torch.Tensor:
    """[B] a_cd of each row of a batch: `attention.a_cd_from_maps` of that row alone (Eq. 5, normalised
    per valid query, head and layer); 0 for a row whose items all share one domain."""
    dom = domain_idx.long()
    valid = dom != 0
    mass = cross_mass_per_row([m.double() for m in maps], dom, valid)  # [B, Lq]
    return (mass * valid).sum(1) / valid.sum(1).clamp_min(1)


TRANSFER_GROUPS = ("both correct", "single ✓ cd ✗", "single ✗ cd ✓", "both wrong")


def transfer_groups(single_hit: dict[str, bool], cd_hit: dict[str, bool]) -> dict[str, list[str]]:
    """The paper's Table 1 strata: sequences evaluated by both models, by which of them got the target
    into the top K (``*_hit``: sequence_id -> hit). Sequences missing from either are left out."""
    groups: dict[str, list[str]] = {g: [] for g in TRANSFER_GROUPS}
    for sid in sorted(single_hit.keys() & cd_hit.keys()):
        # (single hit, cd hit): (✓, ✓) -> 0, (✓, ✗) -> 1, (✗, ✓) -> 2, (✗, ✗) -> 3, the order of TRANSFER_GROUPS
        groups[TRANSFER_GROUPS[2 * (not single_hit[sid]) + (not cd_hit[sid])]].append(sid)
    return groups


RANK_GROUPS = ("single ranks higher", "tied", "cd ranks higher")


def rank_groups(single_rank: Mapping[str, int], cd_rank: Mapping[str, int]) -> dict[str, list[str]]:
    """Table 1's strata without the top-10 cut: which of the two models ranks each example's target higher
    (0-based ranks, ``*_rank``: sequence_id -> rank). Every example scored by both counts, not only the
    few that either model gets into its top 10, so it still separates the methods where hit rates are
    small. Sequences missing from either are left out."""
    groups: dict[str, list[str]] = {g: [] for g in RANK_GROUPS}
    for sid in sorted(single_rank.keys() & cd_rank.keys()):
        s, c = single_rank[sid], cd_rank[sid]
        groups[RANK_GROUPS[0 if s < c else 1 if s == c else 2]].append(sid)
    return groups


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged); NaN when either side is constant or has < 2 values."""
    rx = pd.Series(np.asarray(x, dtype=np.float64)).rank(method="average").to_numpy()
    ry = pd.Series(np.asarray(y, dtype=np.float64)).rank(method="average").to_numpy()
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def transfer_by_a_cd(
    single_rank: Mapping[str, int], cd_rank: Mapping[str, int], a_cd: Mapping[str, float], bins: int = 5
) -> dict[str, Any]:
    """Is `cd` worse than `single` where it attends more across domains (the premise of the paper's
    Figures 2-3), over every example scored by both models and with an a_cd value.

    The examples are split into ``bins`` equal-count bins of `cd`'s per-example a_cd (``a_cd``:
    sequence_id -> value, `per_sequence_a_cd`); per bin: the number of examples, the bin's a_cd range and
    mean, the share of examples that `single` ranks higher than `cd` (negative transfer) and that `cd`
    ranks higher, and the mean of log10(rank_cd + 1) − log10(rank_single + 1) (positive: `cd` ranks the
    target lower). ``spearman`` is the rank correlation of a_cd with that difference over all examples
    (positive: more cross-domain attention goes with `cd` doing worse than `single`).
    """
    if bins < 1:
        raise ValueError(f"transfer_by_a_cd: bins must be >= 1, got {bins}")
    sids = sorted(single_rank.keys() & cd_rank.keys() & a_cd.keys())
    a = np.array([a_cd[s] for s in sids], dtype=np.float64)
    diff = log_rank(np.array([cd_rank[s] for s in sids])) - log_rank(np.array([single_rank[s] for s in sids]))
    out: dict[str, Any] = {"n": len(sids), "spearman": spearman(a, diff), "bins": []}
    for idx in np.array_split(np.argsort(a, kind="stable"), bins):
        if len(idx) == 0:
            continue
        out["bins"].append(
            {
                "n": len(idx),
                "a_cd_min": float(a[idx].min()),
                "a_cd_max": float(a[idx].max()),
                "a_cd_mean": float(a[idx].mean()),
                "share_single_higher": float((diff[idx] > 0).mean()),
                "share_cd_higher": float((diff[idx] < 0).mean()),
                "d_log10_rank": float(diff[idx].mean()),
            }
        )
    return out


def add_domain_pair_mass(
    maps: list[torch.Tensor], domain_idx: torch.Tensor, mass: torch.Tensor, queries: torch.Tensor
) -> None:
    """Accumulate per-layer maps [B, H, L, L] into mass[d_query, d_key] and the query counts per domain.

    Counts are in (query position x head x layer) units, so ``mass / queries`` is a mean attention row.
    """
    D1 = mass.shape[0]
    dom = domain_idx.long()
    onehot = torch.nn.functional.one_hot(dom, D1).to(torch.float64)  # [B, L, D+1]; padding -> column 0
    valid = (dom != 0).to(torch.float64)
    for m in maps:
        per_key = (
            m.to(torch.float64).sum(1) @ onehot
        )  # [B, L(query), D+1]: mass on each key domain, summed over heads
        mass += torch.einsum("bqd,bqe->de", onehot * valid[..., None], per_key)
        queries += (onehot * valid[..., None]).sum((0, 1)) * m.shape[1]


def domain_pair_figure(matrix: np.ndarray, domains: list[str], title: str = "") -> Any:
    """Heatmap of ``domain_pair_attention`` with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(domains)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), domains, rotation=45, ha="right")
    ax.set_yticks(range(n), domains)
    ax.set_xlabel("key domain (attended to)")
    ax.set_ylabel("query domain")
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="w" if matrix[i, j] < 0.6 else "k",
                )
    ax.set_title(title or "mean attention mass by domain pair")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- comparing whole rank distributions
def log_rank(ranks: np.ndarray) -> np.ndarray:
    """log10(rank + 1) of 0-based ranks: 0 for a target ranked first, one unit per decade below that."""
    return np.log10(np.asarray(ranks, dtype=np.float64) + 1.0)


def ndcg_values(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-example NDCG@k of 0-based ranks (one relevant item): `evaluation.ndcg_at` on a NumPy array."""
    return evaluation.ndcg_at(torch.as_tensor(np.asarray(ranks, dtype=np.float64)), k).numpy()


def rank_summary(ranks: np.ndarray, ks: tuple[int, ...] = (10, 100, 1000, 10000)) -> dict[str, float]:
    """NDCG@10, Recall@k for each k, MRR, the mean of log10(rank + 1) and the median rank of one run."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {"n": float(len(r)), "ndcg_10": float(ndcg_values(r).mean())}
    out.update({f"recall_{k}": float((r < k).mean()) for k in ks})
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    out["mean_log10_rank"] = float(log_rank(r).mean())
    out["median_rank"] = float(np.median(r))
    return out


def paired_comparison(
    ranks_a: np.ndarray, ranks_b: np.ndarray, n_boot: int = 2000, seed: int = 0, k: int = 10
) -> dict[str, float]:
    """Run a against run b on the same examples (aligned arrays of 0-based ranks of each example's target).

    Differences are a − b: ``d_log10_rank`` (mean of log10(rank+1); negative = a ranks targets higher)
    and ``d_ndcg_{k}``, each with a 95% paired-bootstrap interval over examples (``*_lo``/``*_hi``:
    resampling the test set, with both models fixed, so it measures how much a difference owes to the
    examples drawn, not to training seeds), and the shares of examples a ranks higher / lower than b.
    """
    a = np.asarray(ranks_a, dtype=np.float64)
    b = np.asarray(ranks_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(
            f"paired_comparison: need two equal-length 1-d rank arrays, got {a.shape} and {b.shape}"
        )
    diffs = {"d_log10_rank": log_rank(a) - log_rank(b), f"d_ndcg_{k}": ndcg_values(a, k) - ndcg_values(b, k)}
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    out: dict[str, float] = {"n": float(len(a))}
    for name, d in diffs.items():
        boot = d[idx].mean(axis=1)
        out[name] = float(d.mean())
        out[f"{name}_lo"], out[f"{name}_hi"] = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    out["share_a_higher"] = float((a < b).mean())
    out["share_a_lower"] = float((a > b).mean())
    return out


def popularity_ranks(
    train_counts: np.ndarray, histories: list[np.ndarray], targets: np.ndarray
) -> np.ndarray:
    """0-based full-ranking rank of each target when items are scored by their training count.

    Candidates are all items 1..N except the example's own history (as `eval.exclude_history`); ties count
    against the target. ``train_counts``: [N + 1], index 0 (padding) ignored.
    """
    counts = np.asarray(train_counts, dtype=np.int64)
    ordered = np.sort(counts[1:])
    out = np.empty(len(targets), dtype=np.int64)
    for i, (hist, t) in enumerate(zip(histories, targets, strict=True)):
        c = counts[t]
        at_least = len(ordered) - int(np.searchsorted(ordered, c, side="left")) - 1  # other items, count >= c
        seen = np.unique(np.asarray(hist, dtype=np.int64))
        seen = seen[(seen != t) & (seen > 0)]
        out[i] = at_least - int((counts[seen] >= c).sum())
    return out


# ----------------------------------------------------------------------------- the Pareto weights over a run
WEIGHT_KEYS = ("alpha2", "a_cd", "loss_rec", "pareto/normalised_loss_rec", "pareto/normalised_a_cd")


def weight_phases(
    history: Mapping[str, Sequence[tuple[int, float]]],
    edges: Sequence[int],
    band: tuple[float, float] | None = None,
    tail: int = 10,
) -> list[dict[str, float]]:
    """What the loss weights did in each phase (a, b] of a run, from its per-step training metrics.

    history: metric name (`WEIGHT_KEYS`, without the ``train/`` prefix) -> (step, value) pairs, as MLflow
    returns them; the ``pareto/*`` keys exist only on solve steps. edges: ascending step boundaries, the
    phases being (edges[0], edges[1]], (edges[1], edges[2]], ... band: the free band of L̃_cd / L̃_rec
    (`pareto.free_band`) for the run's preference vector, or None for methods without a solve.
    Per phase: ``steps``; ``alpha2_mean``; the shares of steps trained on L_rec alone (α2 = 0) and on a_cd
    alone (α2 = 1); ``a_cd_end`` / ``loss_rec_end``, the means of the phase's last `tail` steps (one batch
    is noisy); with a band, ``solves``, their median L̃_cd / L̃_rec and the shares of solves below, inside
    and above the band (S = {p_k, k < pref}, empty, {p_k, k > pref}).
    """
    if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"weight_phases: edges must be at least two ascending steps, got {list(edges)}")
    series = {
        k: (np.asarray([s for s, _ in history.get(k, ())], dtype=np.int64),
            np.asarray([v for _, v in history.get(k, ())], dtype=np.float64))
        for k in WEIGHT_KEYS
    }  # fmt: skip
    if not len(series["alpha2"][0]):
        raise ValueError("weight_phases: the run logged no alpha2 (train/alpha2) metric")
    rows: list[dict[str, float]] = []
    for a, b in itertools.pairwise(edges):

        def part(key: str, a: int = a, b: int = b) -> np.ndarray:
            steps, values = series[key]
            inside = (steps > a) & (steps <= b)
            return values[inside][np.argsort(steps[inside], kind="stable")]

        alpha2, a_cd, loss_rec = part("alpha2"), part("a_cd"), part("loss_rec")
        row: dict[str, float] = {
            "first_step": float(a + 1),
            "last_step": float(b),
            "steps": float(len(alpha2)),
        }
        if len(alpha2):
            row |= {
                "alpha2_mean": float(alpha2.mean()),
                "share_rec_only": float((alpha2 == 0.0).mean()),
                "share_cd_only": float((alpha2 == 1.0).mean()),
                "a_cd_end": float(a_cd[-tail:].mean()) if len(a_cd) else math.nan,
                "loss_rec_end": float(loss_rec[-tail:].mean()) if len(loss_rec) else math.nan,
            }
        if band is not None:
            rec, cd = part("pareto/normalised_loss_rec"), part("pareto/normalised_a_cd")
            if len(rec) != len(cd):
                raise ValueError(
                    f"weight_phases: steps {a + 1}-{b} have {len(rec)} pareto/normalised_loss_rec but "
                    f"{len(cd)} pareto/normalised_a_cd values"
                )
            ratio = cd / rec
            row["solves"] = float(len(ratio))
            if len(ratio):
                row |= {
                    "ratio_median": float(np.median(ratio)),
                    "share_below_band": float((ratio <= band[0]).mean()) if band[0] > 0 else 0.0,
                    "share_in_band": float(((ratio > band[0]) & (ratio < band[1])).mean()),
                    "share_above_band": float((ratio >= band[1]).mean()),
                }
        rows.append(row)
    return rows
