"""Correctness of the model core on an accelerator: what a session with a lent GPU runs first (bench/gpu.sh).

    python bench/device_check.py --device cuda [--out DIR]

The unit tests run on the CPU only (CI has no GPU). This script runs the same model code on ``--device`` and
compares it with the CPU, so device-specific faults (a tensor created on the wrong device, a kernel that
treats padding or masks differently, bf16 under autocast) show up in the first minute of a GPU session
instead of in a day-long training run. For each backbone (SASRec, BERT4Rec) and encoder (plain attention
with a_cd inside it; AutoCDSR⁺ IB tokens), on padded synth-like batches (four domains, variable lengths):

- ``fp32``: the same weights and batch on the CPU and on the device (TF32 off): L_rec, a_cd, the Pareto
  weights of a solve step (`LossBalancer`, ParetoMTL hull so both task gradients count) and every
  parameter's gradient agree to float32 precision;
- ``bf16``: bf16 autocast on the device against fp32 on the device, full and sampled softmax: finite, and
  loss, a_cd, weights and gradient direction agree to bf16 precision (the bounds of the CPU test
  ``test_bf16_autocast_step_matches_fp32``);
- ``causal`` (SASRec): changing item j leaves every output at positions < j unchanged on the device;
- ``retrieval``: `recommend` (top-k, optionally within the target domain) agrees with the CPU;
- ``training``: a few AdamW steps of AutoCDSR (re-solving every other step) follow the CPU's losses, and the
  weights end where the CPU's do (distance between the two runs ≤ 5% of how far training moved them).

Prints one line per check and, last, a JSON object with ``passed``/``failed`` counts and every check's
figures (also written to ``--out``/device_check.json). Exit status 1 if any check fails. ``--device cpu``
compares the CPU with itself (it runs every code path; the test suite uses it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from step_time import item_domain_table, make_sequences  # noqa: E402

from autocdsr.data import batching  # noqa: E402
from autocdsr.models import build_model  # noqa: E402
from autocdsr.models.config import ModelConfig  # noqa: E402
from autocdsr.objectives.balancer import BalancerConfig, LossBalancer  # noqa: E402
from autocdsr.objectives.pareto import ParetoConfig  # noqa: E402
from autocdsr.synth import DEFAULT_DOMAINS  # noqa: E402

Batch = dict[str, torch.Tensor]
NUM_ITEMS = int(sum(d.n_items for d in DEFAULT_DOMAINS))

# fp32 on two devices: the same maths in a different order (and different attention kernels)
FP32_REL = 1e-4
FP32_GRAD_REL = 2e-3  # max |Δg| over max |g|, per parameter tensor
FP32_WEIGHT_ABS = 1e-3
# bf16 autocast against fp32 (as tests/test_models.py::test_bf16_autocast_step_matches_fp32)
BF16_LOSS_REL = 0.02
BF16_A_CD_ABS = 0.01
BF16_WEIGHT_ABS = 0.05
BF16_GRAD_COS = 0.99
CAUSAL_ABS = 1e-5
TRAIN_LOSS_REL = 2e-3
# ‖θ_device − θ_cpu‖ / ‖θ_cpu − θ_0‖ after the steps: how far apart the runs ended against how far they moved
TRAIN_PARAM_DRIFT = 0.05


@dataclass
class Check:
    name: str
    ok: bool
    figures: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def model_config(backbone: str, ib: bool, length: int, loss: str = "full", **kw: Any) -> ModelConfig:
    return ModelConfig(
        backbone=backbone,  # type: ignore[arg-type]
        num_items=NUM_ITEMS,
        num_domains=len(DEFAULT_DOMAINS),
        max_len=length,
        dropout=0.0,  # the CPU and the device draw different dropout masks
        ib=ib,
        loss=loss,  # type: ignore[arg-type]
        num_sampled=256,
        **kw,
    )


def make_sequences_padded(
    batch: int, length: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray], np.random.Generator]:
    """Synth-like sequences of random lengths 4..length + 1 (the first one full), and the generator."""
    rng = np.random.default_rng(seed)
    items, doms = make_sequences(batch, length + 1, stickiness=0.7, rng=rng)
    cut = rng.integers(4, length + 2, size=batch)
    cut[0] = length + 1
    items = [s[-c:] for s, c in zip(items, cut, strict=True)]
    doms = [d[-c:] for d, c in zip(doms, cut, strict=True)]
    return items, doms, rng


def make_batch(backbone: str, batch: int, length: int, seed: int) -> Batch:
    """A training batch (left padding) as the data path builds it."""
    items, doms, rng = make_sequences_padded(batch, length, seed)
    if backbone == "sasrec":
        return batching.sasrec_batch(items, doms, length)
    return batching.cloze_batch(items, doms, length, 0.2, NUM_ITEMS + 1, rng)


def on_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An independent copy of ``model`` (same weights) on ``device``."""
    return copy.deepcopy(model).to(device)


def to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def solve_step(model: torch.nn.Module, batch: Batch, amp: bool) -> tuple[Any, list[torch.Tensor | None]]:
    """One solve step as `train_worker` runs it: forward (under autocast if ``amp``), balancer backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    device = next(model.parameters()).device
    balancer = LossBalancer(
        BalancerConfig(method="autocdsr", update_every=1, pareto=ParetoConfig(include_task_gradients=True))
    )
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
        out = model(batch)
    info = balancer.backward(out.loss_rec, out.a_cd, list(model.shared_parameters()), params, 1)
    return info, [None if p.grad is None else p.grad.detach().float().cpu() for p in params]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def grad_figures(ref: list[torch.Tensor | None], got: list[torch.Tensor | None]) -> dict[str, float]:
    """Worst per-tensor max|Δg|/max|g|, overall cosine, and whether both have the same tensors with grads."""
    worst, same = 0.0, True
    for r, g in zip(ref, got, strict=True):
        if (r is None) != (g is None):
            same = False
            continue
        if r is None or g is None:
            continue
        scale = float(r.abs().max())
        if scale > 0:
            worst = max(worst, float((r - g).abs().max()) / scale)
        elif float(g.abs().max()) > 0:
            worst = math.inf
    flat_r = torch.cat([r.flatten() for r in ref if r is not None])
    flat_g = torch.cat([g.flatten() for g in got if g is not None])
    cos = float(F.cosine_similarity(flat_r, flat_g, dim=0)) if flat_r.shape == flat_g.shape else -1.0
    finite = bool(torch.isfinite(flat_g).all())
    return {"grad_max_rel": worst, "grad_cos": cos, "same_grad_tensors": float(same), "finite": float(finite)}


def check_fp32(backbone: str, ib: bool, device: torch.device, shape: tuple[int, int]) -> Check:
    torch.manual_seed(0)
    ref_model = build_model(model_config(backbone, ib, shape[1]), item_domain_table()).train()
    dev_model = on_device(ref_model, device)
    batch = make_batch(backbone, *shape, seed=1)
    ref, g_ref = solve_step(ref_model, batch, amp=False)
    got, g_got = solve_step(dev_model, to(batch, device), amp=False)
    f = {
        "loss_rec_rel": rel(ref.loss_rec, got.loss_rec),
        "a_cd_rel": rel(ref.a_cd, got.a_cd),
        "alpha1_abs": abs(ref.alpha1 - got.alpha1),
        "alpha2_abs": abs(ref.alpha2 - got.alpha2),
        **grad_figures(g_ref, g_got),
    }
    ok = (
        f["loss_rec_rel"] <= FP32_REL
        and f["a_cd_rel"] <= FP32_REL
        and max(f["alpha1_abs"], f["alpha2_abs"]) <= FP32_WEIGHT_ABS
        and f["grad_max_rel"] <= FP32_GRAD_REL
        and f["same_grad_tensors"] == 1.0
        and f["finite"] == 1.0
    )
    return Check(f"fp32 {backbone} {'plus' if ib else 'plain'}: device == cpu", ok, f)


def check_bf16(backbone: str, ib: bool, loss: str, device: torch.device, shape: tuple[int, int]) -> Check:
    torch.manual_seed(0)
    model = build_model(model_config(backbone, ib, shape[1], loss=loss), item_domain_table()).to(device)
    model.train()
    batch = to(make_batch(backbone, *shape, seed=2), device)
    results, low_precision = [], []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: (
            low_precision.append(o.dtype == torch.bfloat16) if isinstance(o, torch.Tensor) else None
        )
    )
    try:
        for amp in (False, True):
            torch.manual_seed(3)  # the same sampled negatives in both passes
            low_precision.clear()
            results.append(solve_step(model, batch, amp))
    finally:
        hook.remove()
    (ref, g_ref), (got, g_got) = results
    f = {
        "bf16_module_outputs": float(sum(low_precision)),  # autocast really ran layers in bf16
        "loss_rec_rel": rel(ref.loss_rec, got.loss_rec),
        "a_cd_abs": abs(ref.a_cd - got.a_cd),
        "alpha1_abs": abs(ref.alpha1 - got.alpha1),
        "alpha2_abs": abs(ref.alpha2 - got.alpha2),
        **grad_figures(g_ref, g_got),
    }
    ok = (
        f["bf16_module_outputs"] > 0
        and math.isfinite(got.loss_rec)
        and math.isfinite(got.a_cd)
        and f["loss_rec_rel"] <= BF16_LOSS_REL
        and f["a_cd_abs"] <= BF16_A_CD_ABS
        and max(f["alpha1_abs"], f["alpha2_abs"]) <= BF16_WEIGHT_ABS
        and f["grad_cos"] >= BF16_GRAD_COS
        and f["finite"] == 1.0
    )
    return Check(f"bf16 {backbone} {'plus' if ib else 'plain'} {loss}: autocast ~ fp32", ok, f)


@torch.no_grad()
def check_causal(ib: bool, device: torch.device, shape: tuple[int, int], backbone: str = "sasrec") -> Check:
    """SASRec: replacing the item at position j (same domain) changes no output at positions < j.
    (BERT4Rec is bidirectional, so there the check must fail: the test suite uses that to test the check.)"""
    torch.manual_seed(0)
    model = build_model(model_config(backbone, ib, shape[1]), item_domain_table()).to(device).eval()
    batch = make_batch(backbone, *shape, seed=4)
    length = shape[1]
    worst_before, moved_after = 0.0, 0.0
    for j in (length // 3, length // 2, length - 2):
        changed = {k: v.clone() for k, v in batch.items()}
        items, doms = changed["item_idx"], changed["domain_idx"]
        row = 0  # the full row
        dom = int(doms[row, j])
        lo = int(np.flatnonzero(item_domain_table() == dom)[0])
        items[row, j] = lo if int(items[row, j]) != lo else lo + 1
        a = model(to(batch, device)).hidden[row].float().cpu()
        b = model(to(changed, device)).hidden[row].float().cpu()
        worst_before = max(worst_before, float((a[:j] - b[:j]).abs().max()))
        moved_after = max(moved_after, float((a[j:] - b[j:]).abs().max()))
    f = {"max_change_before_j": worst_before, "max_change_from_j": moved_after}
    ok = worst_before <= CAUSAL_ABS and moved_after > CAUSAL_ABS  # and the change is visible at j
    return Check(f"causal {backbone} {'plus' if ib else 'plain'}: item j never reaches < j", ok, f)


@torch.no_grad()
def check_retrieval(backbone: str, ib: bool, device: torch.device, shape: tuple[int, int]) -> Check:
    torch.manual_seed(0)
    ref_model = build_model(model_config(backbone, ib, shape[1]), item_domain_table()).eval()
    dev_model = on_device(ref_model, device)
    items, doms, _ = make_sequences_padded(*shape, seed=5)
    hist = batching.eval_batch(items, doms, shape[1])  # history + the target's domain, as evaluation
    target_dom = hist["target_domain"]
    table = torch.as_tensor(item_domain_table())
    f: dict[str, float] = {}
    ok = True
    for restrict in (False, True):
        # one CPU call with k = 21: the top 20 to compare, and the 21st score for the tie gap below
        s21, i21 = ref_model.recommend(hist["item_idx"], hist["domain_idx"], target_dom, 21, restrict)
        s_ref, i_ref = s21[:, :20], i21[:, :20]
        s_got, i_got = dev_model.recommend(
            hist["item_idx"].to(device), hist["domain_idx"].to(device), target_dom.to(device), 20, restrict
        )
        s_got, i_got = s_got.float().cpu(), i_got.cpu()
        tag = "domain" if restrict else "all"
        f[f"{tag}_score_abs"] = float((s_ref - s_got).abs().max())
        f[f"{tag}_topk_overlap"] = float(
            np.mean([len(set(a.tolist()) & set(b.tolist())) / 20 for a, b in zip(i_ref, i_got, strict=True)])
        )
        # the same items, unless some row's 20th and 21st CPU scores (nearly) tie
        f[f"{tag}_kth_gap"] = float((s21[:, 19] - s21[:, 20]).abs().min())
        ok &= f[f"{tag}_score_abs"] <= 1e-3 and (
            f[f"{tag}_topk_overlap"] == 1.0 or f[f"{tag}_kth_gap"] < 1e-3
        )
        ok &= bool((i_got != 0).all())
        if restrict:
            f["domain_violations"] = float((table[i_got] != target_dom[:, None]).sum())
            ok &= f["domain_violations"] == 0
    return Check(f"retrieval {backbone} {'plus' if ib else 'plain'}: recommend == cpu", ok, f)


def check_training(
    backbone: str, ib: bool, device: torch.device, shape: tuple[int, int], steps: int
) -> Check:
    """AdamW steps with AutoCDSR re-solving every other step: the device follows the CPU's losses."""
    torch.manual_seed(0)
    ref_model = build_model(model_config(backbone, ib, shape[1]), item_domain_table()).train()
    models = {"cpu": ref_model, "device": on_device(ref_model, device)}
    start = torch.cat([p.detach().flatten().clone() for p in ref_model.parameters()])
    batches = [make_batch(backbone, *shape, seed=10 + s) for s in range(steps)]
    losses: dict[str, list[float]] = {}
    for name, model in models.items():
        dev = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
        balancer = LossBalancer(BalancerConfig(method="autocdsr", update_every=2))
        losses[name] = []
        for s, batch in enumerate(batches, start=1):
            opt.zero_grad(set_to_none=True)
            out = model(to(batch, dev))
            info = balancer.backward(out.loss_rec, out.a_cd, list(model.shared_parameters()), params, s)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses[name].append(info.loss_rec)
    worst = max(rel(a, b) for a, b in zip(losses["cpu"], losses["device"], strict=True))
    end = {
        n: torch.cat([p.detach().float().cpu().flatten() for p in m.parameters()]) for n, m in models.items()
    }
    drift = float((end["device"] - end["cpu"]).norm() / (end["cpu"] - start).norm().clamp_min(1e-12))
    f = {
        "loss_rec_max_rel": worst,
        "param_drift": drift,
        "first_loss": losses["cpu"][0],
        "last_loss": losses["cpu"][-1],
    }
    ok = (
        worst <= TRAIN_LOSS_REL
        and drift <= TRAIN_PARAM_DRIFT
        and all(math.isfinite(x) for x in losses["device"])
    )
    return Check(f"training {backbone} {'plus' if ib else 'plain'}: {steps} steps follow cpu", ok, f)


def run_checks(device: torch.device, quick: bool) -> list[Check]:
    shape = (6, 24) if quick else (16, 96)
    steps = 3 if quick else 6
    jobs: list[tuple[str, Callable[[], Check]]] = []
    for backbone in ("sasrec", "bert4rec"):
        for ib in (False, True):
            kind = f"{backbone} {'plus' if ib else 'plain'}"
            jobs.append((f"fp32 {kind}", lambda b=backbone, i=ib: check_fp32(b, i, device, shape)))
            for loss in ("full", "sampled"):
                jobs.append(
                    (
                        f"bf16 {kind} {loss}",
                        lambda b=backbone, i=ib, lo=loss: check_bf16(b, i, lo, device, shape),
                    )
                )
            if backbone == "sasrec":
                jobs.append((f"causal {kind}", lambda i=ib: check_causal(i, device, shape)))
            jobs.append((f"retrieval {kind}", lambda b=backbone, i=ib: check_retrieval(b, i, device, shape)))
            jobs.append(
                (f"training {kind}", lambda b=backbone, i=ib: check_training(b, i, device, shape, steps))
            )
    checks = []
    for name, job in jobs:
        start = time.perf_counter()
        try:
            check = job()
        except Exception as exc:  # a crash on the device is a finding, not the end of the report
            check = Check(name, False, error=f"{type(exc).__name__}: {exc}")
        check.figures["seconds"] = time.perf_counter() - start
        figures = ", ".join(f"{k} {v:.3g}" for k, v in check.figures.items())
        print(
            f"{'PASS' if check.ok else 'FAIL'}  {check.name}  ({figures}){'  ' + check.error if check.error else ''}"
        )
        checks.append(check)
    return checks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/device_check.py",
        description="Model core on an accelerator against the CPU: fp32 parity, bf16 autocast, causality, "
        "retrieval, a few training steps. Exit status 1 if any check fails.",
    )
    p.add_argument("--device", default="cuda", help="device to check against the CPU (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller batches and fewer steps (seconds on a CPU)")
    p.add_argument("--out", type=Path, help="also write device_check.json into this folder")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device here")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity needs true fp32 matmuls
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(device)
    else:
        name = device.type
    print(f"device_check: {name}, torch {torch.__version__}")
    checks = run_checks(device, args.quick)
    failed = [c.name for c in checks if not c.ok]
    report = {
        "device": name,
        "torch": torch.__version__,
        "passed": len(checks) - len(failed),
        "failed": len(failed),
        "failed_checks": failed,
        "checks": {
            c.name: {"ok": c.ok, **c.figures, **({"error": c.error} if c.error else {})} for c in checks
        },
    }
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "device_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("device", "torch", "passed", "failed", "failed_checks")}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
