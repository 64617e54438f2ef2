"""The held-out gate (autocdsr.objectives.gate): its estimate against a direct computation from attention maps,
its pair estimator against brute force, what it leaves behind, two DDP ranks, and a gated training run
against a run with the same query weights fixed from the start."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from autocdsr.config import load_train_config
from autocdsr.data import shards
from autocdsr.data.memory import in_memory_batches
from autocdsr.models import ModelConfig, build_model
from autocdsr.models.attention import a_cd_from_maps
from autocdsr.objectives.gate import GateConfig, heldout_batch, probe, unbiased_dots
from autocdsr.training import LocalContext, train_worker
from tests.conftest import free_tcp_port, gloo_group

V, D, MAX_LEN = 60, 3, 16
ITEM_DOMAIN = torch.tensor([0] + [1 + (i - 1) // (V // D) for i in range(1, V + 1)])


def make_model(dropout: float = 0.0, seed: int = 0, backbone: str = "sasrec") -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        backbone=backbone, num_items=V, num_domains=D, max_len=MAX_LEN, d_model=16, n_layers=2, n_heads=2,
        dropout=dropout,
    )  # fmt: skip
    model = build_model(cfg, ITEM_DOMAIN)
    with torch.no_grad():  # visible signal on every path
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def heldout_batches(seed: int, n: int, size: int = 6, mask_token: int | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items, doms = [], []
        for _ in range(size):
            length = int(rng.integers(3, MAX_LEN + 2))
            d = rng.integers(1, D + 1, size=length)
            items.append((d - 1) * (V // D) + rng.integers(1, V // D + 1, size=length))
            doms.append(d)
        out.append(heldout_batch(items, doms, MAX_LEN, mask_token))
    return out


def shared_of(model) -> list[torch.Tensor]:
    return list(model.shared_parameters())


def direct_gradients(model, batch) -> torch.Tensor:
    """[D + 1, P]: ∇a_cd^(q) for q = 1..D (Eq. 5 over domain q's rows, from explicit maps) and ∇L_val."""
    out = model._encode_batch(batch, need_a_cd=False, return_maps=True)
    valid = batch["item_idx"] != 0
    rows = []
    for q in range(D):
        weights = tuple(float(d == q) for d in range(D))
        value = a_cd_from_maps(out.maps, batch["domain_idx"], valid, None, weights)
        rows.append(grad(value, model))
    targets = batch["target_idx"]
    last = targets != 0
    rows.append(grad(model.rec_loss(out.hidden[last], targets[last]), model))
    return torch.stack(rows)


def grad(value: torch.Tensor, model) -> torch.Tensor:
    params = shared_of(model)
    gs = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params, strict=True)]
    ).double()


def test_heldout_batch_has_only_the_last_item_as_target():
    items, doms = [np.array([5, 6, 25, 45]), np.array([7, 8])], [np.array([1, 1, 2, 3]), np.array([1, 1])]
    b = heldout_batch(items, doms, 4)
    assert b["target_idx"].tolist() == [[0, 0, 45], [0, 0, 8]]
    assert b["item_idx"].tolist() == [[5, 6, 25], [0, 0, 7]]
    assert b["target_domain"][:, -1].tolist() == [3, 1]


def test_bert4rec_heldout_batch_is_the_serving_layout():
    """History, then [MASK] tagged with the target's domain: its state is `BERT4Rec.user_embedding`'s."""
    model = make_model(backbone="bert4rec")
    model.eval()
    m = model.cfg.mask_token
    items, doms = [np.array([5, 6, 25, 45]), np.array([7, 8])], [np.array([1, 1, 2, 3]), np.array([1, 1])]
    b = heldout_batch(items, doms, 4, mask_token=m)
    assert b["item_idx"].tolist() == [[5, 6, 25, m], [0, 0, 7, m]]
    assert b["domain_idx"].tolist() == [[1, 1, 2, 3], [0, 0, 1, 1]]
    assert b["target_idx"].tolist() == [[0, 0, 0, 45], [0, 0, 0, 8]]
    serving = model.user_embedding(b["item_idx"][:, :-1], b["domain_idx"][:, :-1], b["domain_idx"][:, -1])
    hidden = model(b, need_a_cd=False).hidden[:, -1]
    torch.testing.assert_close(torch.nn.functional.normalize(hidden, dim=-1), serving)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_probe_equals_the_pair_estimate_from_attention_maps(backbone):
    model = make_model(backbone=backbone)
    mask = model.cfg.mask_token if backbone == "bert4rec" else None
    batches = heldout_batches(0, 4, mask_token=mask)
    g = torch.stack([direct_gradients(model, b) for b in batches])  # [N, D + 1, P]
    n = g.shape[0]
    expected = torch.stack(
        [
            sum(g[i, q] @ g[j, D] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
            for q in range(D)
        ]
    )
    result = probe(model, batches, shared_of(model), previous=(1.0,) * D)
    torch.testing.assert_close(torch.tensor(result.u, dtype=torch.float64), expected, rtol=1e-4, atol=1e-9)
    assert result.weights == tuple(1.0 if u > 0 else 0.0 for u in expected.tolist())
    assert set(result.weights) == {0.0, 1.0}, "pick data where the gate keeps some domains and drops others"
    losses = [model(b).loss_rec.item() for b in batches]
    assert result.heldout_loss == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_jackknife_se_and_min_z_against_leaving_each_batch_out():
    model, batches = make_model(), heldout_batches(2, 5)
    g = torch.stack([direct_gradients(model, b) for b in batches])  # [N, D + 1, P]
    n = g.shape[0]

    def u_of(rows: list[int]) -> torch.Tensor:
        pairs = [(i, j) for i, j in itertools.permutations(rows, 2)]
        return torch.stack([sum(g[i, q] @ g[j, D] for i, j in pairs) / len(pairs) for q in range(D)])

    loo = torch.stack([u_of([j for j in range(n) if j != i]) for i in range(n)])
    se = ((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0)).sqrt()
    z = (u_of(list(range(n))).abs() / se).tolist()
    result = probe(model, batches, shared_of(model), previous=(0.5,) * D, min_z=1e-9)
    torch.testing.assert_close(torch.tensor(result.se, dtype=torch.float64), se, rtol=1e-4, atol=1e-12)
    assert result.weights == tuple(1.0 if u > 0 else 0.0 for u in result.u)
    # a threshold between the domains' z: only the clear ones change, the others keep their weight
    cut = sorted(z)[0] + 0.5 * (sorted(z)[1] - sorted(z)[0])
    assert sorted(z)[1] - sorted(z)[0] > 0.1, "pick data whose domains differ in z"
    result = probe(model, batches, shared_of(model), previous=(0.5,) * D, min_z=cut)
    expected = tuple(0.5 if zq <= cut else (1.0 if u > 0 else 0.0) for zq, u in zip(z, result.u, strict=True))
    assert result.weights == expected and 0.5 in expected
    assert set(result.as_metrics(["a", "b", "c"])) >= {"gate/se/a", "gate/se/c"}
    assert probe(model, batches, shared_of(model), previous=(0.5,) * D, min_z=1e9).weights == (0.5,) * D


def test_probe_leaves_no_trace_and_keeps_weights_of_domains_it_did_not_see():
    model = make_model(dropout=0.2)
    model.set_query_weights((0.5, 1.0, 2.0))
    model.eval()
    batches = heldout_batches(1, 3)
    for b in batches:  # no row of domain 3 anywhere: its weight is carried over
        keep = b["domain_idx"] != 3
        for key in ("item_idx", "domain_idx", "target_idx", "target_domain"):
            b[key] = b[key] * keep
    rng = torch.get_rng_state()
    result = probe(model, batches, shared_of(model), previous=(0.5, 1.0, 2.0))
    assert torch.equal(torch.get_rng_state(), rng), "dropout in the probe must not shift training's stream"
    assert model.query_weights == (0.5, 1.0, 2.0) and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert np.isnan(result.u[2]) and result.weights[2] == 2.0
    assert all(w in (0.0, 1.0) for w in result.weights[:2])


def test_pair_estimates_and_jackknife_equal_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    n, tasks, dim = 7, 3, 11
    g = torch.randn(n, tasks, dim, generator=gen, dtype=torch.float64) + torch.randn(
        tasks, dim, generator=gen
    )

    def estimate(rows: list[int]) -> torch.Tensor:  # mean over ordered pairs of distinct batches
        pairs = [(i, j) for i, j in itertools.product(rows, rows) if i != j]
        return sum(g[i] @ g[j].T for i, j in pairs) / len(pairs)

    u, se = unbiased_dots(g)
    torch.testing.assert_close(u, estimate(list(range(n))))
    loo = torch.stack([estimate([j for j in range(n) if j != i]) for i in range(n)])
    ratio = loo / torch.diagonal(loo, dim1=1, dim2=2)[:, None, :]
    expected = ((n - 1) / n * ((ratio - ratio.mean(0)) ** 2).sum(0)).sqrt()
    torch.testing.assert_close(se, expected)
    # the same-batch products are left out: an estimate from one batch's gradients alone is biased
    assert not torch.allclose(u, (g.mean(0) @ g.mean(0).T))


def test_gate_config_is_checked():
    with pytest.raises(ValueError, match="batches"):
        GateConfig(batches=1)
    with pytest.raises(ValueError, match="every"):
        GateConfig(every=-1)
    with pytest.raises(ValueError, match="batches >= 3"):
        GateConfig(batches=2, min_z=2.0)
    with pytest.raises(ValueError, match="initial"):
        GateConfig(initial=-1.0)
    assert load_train_config(
        None, ["method=cd+autocdsr", "model.backbone=bert4rec", "autocdsr.gate.enabled=true"]
    ).gate_active
    with pytest.raises(Exception, match="cd_query_weights"):
        load_train_config(
            None, ["method=cd+autocdsr", "model.cd_query_weights={x: 0}", "autocdsr.gate.enabled=true"]
        )
    assert not load_train_config(None, ["method=cd", "autocdsr.gate.enabled=true"]).gate_active
    # YAML 1.1 leaves `1e6` a string: float fields take it as the number it reads as
    cfg = load_train_config(None, ["autocdsr.gate.min_z=1e6", "train.lr=2.5E-4"])
    assert cfg.autocdsr.gate.min_z == 1e6 and cfg.train.lr == 2.5e-4
    with pytest.raises(Exception, match="min_z: expected a number"):
        load_train_config(None, ["autocdsr.gate.min_z=1e"])


# ----------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        model = make_model()
        batches = heldout_batches(0, 4)[rank * 2 : rank * 2 + 2]  # this rank's share of the same four
        result = probe(model, batches, shared_of(model), previous=(1.0,) * D, min_z=0.5)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def test_ddp_ranks_get_the_estimate_of_all_their_batches(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_tcp_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    model = make_model()
    single = probe(model, heldout_batches(0, 4), shared_of(model), previous=(1.0,) * D, min_z=0.5)
    assert ranks[0] == ranks[1], "every rank must choose the same weights from the same numbers"
    torch.testing.assert_close(torch.tensor(ranks[0].u), torch.tensor(single.u), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(torch.tensor(ranks[0].se), torch.tensor(single.se), rtol=1e-5, atol=1e-9)
    assert ranks[0].weights == single.weights


# ------------------------------------------------------------------------------------------ training

SETTINGS = [
    "method=cd+autocdsr", "model.d_model=16", "model.n_layers=2", "model.n_heads=2", "data.max_len=20",
    "train.batch_size=16", "train.warmup_steps=4", "autocdsr.start_after=warmup", "train.max_steps=12",
    "train.eval_every=12", "eval.num_negatives=20", "eval.max_val_sequences=64", "autocdsr.update_every=2",
    "autocdsr.gate.batches=3", "autocdsr.gate.sequences=16", "seed=1",
]  # fmt: skip


def _train(data: Path, *extra: str) -> tuple[dict, list[tuple[int, dict]], torch.nn.Module]:
    info = shards.open_dataset(str(data))
    cfg = load_train_config(None, [*SETTINGS, *extra])
    ctx = LocalContext(in_memory_batches(info, cfg))
    logged: list[tuple[int, dict]] = []
    final = train_worker(cfg, info, ctx, log_metrics=lambda m, s: logged.append((s, dict(m))))
    state = torch.load(Path(ctx.last_checkpoint) / "state.pt", weights_only=False)
    return final, logged, state


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_a_gated_run_is_the_run_with_its_weights_fixed_from_the_start(synth_dataset: Path, backbone: str):
    """The probe runs once, before the first step of the a_cd objective (warm-up + 1), sets the query weights
    and touches nothing else: the run equals one configured with those weights from the start."""
    gated, logged, state = _train(synth_dataset, "autocdsr.gate.enabled=true", f"model.backbone={backbone}")
    probes = [(s, m) for s, m in logged if any(k.startswith("gate/") for k in m)]
    assert [s for s, _ in probes] == [5]
    domains = shards.open_dataset(str(synth_dataset)).vocab.domains
    weights = {d: probes[0][1][f"gate/weight/{d}"] for d in domains}
    assert state["gate"] == {"weights": [weights[d] for d in domains], "last_probe": 5}
    assert any(weights.values()), "pick a seed where the gate keeps at least one domain"
    fixed, logged_fixed, state_fixed = _train(
        synth_dataset,
        "model.cd_query_weights={" + ", ".join(f"{d}: {w}" for d, w in weights.items()) + "}",
        f"model.backbone={backbone}",
    )
    assert gated == fixed
    for key, value in state["model"].items():
        torch.testing.assert_close(value, state_fixed["model"][key], rtol=0, atol=0, msg=key)
    # a_cd as logged: the same from the probe on (before it, the gated run still counts every row; unused)
    a_cd = [(s, m["train/a_cd"]) for s, m in logged if "train/a_cd" in m and s >= 5]
    assert len(a_cd) == 8 and a_cd == [
        (s, m["train/a_cd"]) for s, m in logged_fixed if "train/a_cd" in m and s >= 5
    ]


def test_the_gate_probes_again_every_n_steps_and_restarts_the_cd_reference(synth_dataset: Path):
    _, logged, state = _train(synth_dataset, "autocdsr.gate.enabled=true", "autocdsr.gate.every=3")
    assert [s for s, m in logged if "gate/heldout_loss_rec" in m] == [5, 8, 11]
    assert state["gate"]["last_probe"] == 11


def test_a_gate_that_starts_from_cd_keeps_it_without_clear_evidence(synth_dataset: Path):
    _, logged, state = _train(
        synth_dataset, "autocdsr.gate.enabled=true", "autocdsr.gate.every=3", "autocdsr.gate.initial=0",
        "autocdsr.gate.min_z=1e6",
    )  # fmt: skip
    probes = [m for _, m in logged if "gate/heldout_loss_rec" in m]
    assert len(probes) == 3 and set(state["gate"]["weights"]) == {0.0}
    assert all(m[k] == 0.0 for m in probes for k in m if k.startswith("gate/weight/"))
    assert all(m[k] > 0 for m in probes for k in m if k.startswith("gate/se/"))
