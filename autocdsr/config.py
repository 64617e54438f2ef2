"""Training configuration: `python -m autocdsr.train --data OUT --config conf/train/NAME.yaml key=value ...`.

Every key below is one dataclass field, read in one place; `docs/configuration.md` lists them with their
meaning. Override any of them on the command line with dotted keys, e.g. ``model.backbone=bert4rec
method=cd+autocdsr train.max_steps=2000 eval.num_negatives=all``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from autocdsr import configtools, security
from autocdsr.configtools import ConfigError
from autocdsr.models.config import ModelConfig
from autocdsr.objectives.balancer import BalancerConfig

Method = Literal["single", "cd", "cd+autocdsr", "cd+autocdsr_plus", "cd+fixed"]
METHODS: tuple[str, ...] = ("single", "cd", "cd+autocdsr", "cd+autocdsr_plus", "cd+fixed")
# mlflow.run_name names a folder under train.storage_path and goes into MLflow search filters.
RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class ModelSection:
    backbone: Literal["sasrec", "bert4rec"] = "sasrec"
    d_model: int = 32
    n_layers: int = 6
    n_heads: int = 4
    dropout: float = 0.1
    temperature: float = 0.05  # Eq. 4: softmax over cosine / temperature
    mask_prob: float = 0.2  # BERT4Rec cloze masking
    num_ib_tokens: int = 1  # AutoCDSR⁺: IB tokens per domain, causal: per domain run (T; docs/benchmarks.md)
    ib_exchange: bool = True  # AutoCDSR⁺: cross-domain exchange between IB tokens (Eq. 14)
    # AutoCDSR⁺: packed rows within this length factor share one attention call, rows of at most ib_short_row
    # tokens all share one; speed only (the CPU's optimum; on a GPU try coarser, e.g. 2 / 64; docs/benchmarks.md)
    ib_bucket_ratio: float = ModelConfig.ib_bucket_ratio
    ib_short_row: int = ModelConfig.ib_short_row
    # SASRec's a_cd: a position's own domain is its item's (input, Eq. 5 as written) or the one it predicts
    # (target). BERT4Rec: the same either way (its masked queries carry their target's domain).
    cd_query_domain: Literal["input", "target"] = "input"
    # Weight of each query row's cross-domain mass in a_cd, by the row's own domain (name -> weight; a domain
    # not named weighs 1, Eq. 5 as written). An ablation of which rows the constraint acts on (docs/results.md,
    # "Per-domain gradient conflict"); full-attention models only. a_cd stays a mean over all valid rows.
    cd_query_weights: dict[str, float] = field(default_factory=dict)
    # How a_cd averages its query rows: "rows" (Eq. 5 as written: every valid row alike) or "domains" (each
    # query domain's rows averaged first, then the domains alike). Full-attention models only.
    cd_query_average: Literal["rows", "domains"] = "rows"
    loss: Literal["full", "sampled"] = "full"  # sampled: softmax over sampled items with logQ correction
    num_sampled: int = 4096

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "num_ib_tokens", "num_sampled", "ib_short_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if not self.ib_bucket_ratio > 1:
            raise ConfigError(f"model.ib_bucket_ratio must be > 1, got {self.ib_bucket_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"model.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.temperature <= 0:
            raise ConfigError(f"model.temperature must be > 0, got {self.temperature}")
        if self.cd_query_domain not in ("input", "target"):
            raise ConfigError(
                f"model.cd_query_domain must be 'input' or 'target', got {self.cd_query_domain!r}"
            )
        bad = {k: v for k, v in self.cd_query_weights.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ConfigError(f"model.cd_query_weights must be finite and >= 0, got {bad}")


@dataclass(frozen=True)
class DataSection:
    max_len: int = 200  # input length; longer histories keep their newest items
    # Robustness study (paper Table 5): this fraction of items gets a wrong domain tag in TRAINING batches
    # (each a random other domain, the same everywhere the item occurs); evaluation keeps the true tags.
    relabel_fraction: float = 0.0
    relabel_seed: int = 0

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ConfigError(f"data.max_len must be >= 2, got {self.max_len}")
        if not 0.0 <= self.relabel_fraction <= 1.0:
            raise ConfigError(f"data.relabel_fraction must be in [0, 1], got {self.relabel_fraction}")


@dataclass(frozen=True)
class TrainSection:
    max_steps: int = 20_000
    eval_every: int = 500  # validation every N steps (paper: 500)
    patience: int = 2_000  # stop when validation NDCG@10 has not improved for N steps (paper: 2,000)
    batch_size: int = 128  # per worker
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 1_000
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    mixed_precision: bool = True  # bf16 autocast, GPU only
    shuffle_buffer: int = 2_048  # rows in Ray Data's local shuffle buffer
    log_every: int = 10  # steps between metric flushes to MLflow (every step is logged)
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails
    nan_policy: Literal["stop", "skip"] = (
        "stop"  # non-finite loss or gradients: stop the run or skip the batch
    )
    max_skipped_batches: int = 10  # with nan_policy=skip, stop after this many
    storage_path: str | None = (
        None  # Ray Train checkpoints; default ./ray_results (use shared storage on a cluster)
    )
    resume: bool = False  # continue the run named by mlflow.run_name from its last checkpoint
    max_minutes: float | None = (
        None  # wall-clock budget of the training loop (per attempt): then validate, keep the best, test
    )

    def __post_init__(self) -> None:
        for name in ("max_steps", "eval_every", "patience", "batch_size", "num_workers", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.max_failures < 0 or self.grad_clip < 0:
            raise ConfigError("train.warmup_steps, train.max_failures and train.grad_clip must be >= 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"train.max_minutes must be > 0 (or null), got {self.max_minutes}")
        if self.lr <= 0 or self.weight_decay < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("train.lr and train.cpus_per_worker must be > 0, train.weight_decay >= 0")


@dataclass(frozen=True)
class EvalSection:
    num_negatives: int | Literal["all"] = 100  # "all" = full ranking
    exclude_history: bool = True  # never use the user's own history as negatives
    seed: int = 0  # negatives are a function of (seed, sequence_id): identical across runs
    batch_size: int = 256
    max_val_sequences: int | None = None  # cap validation cost: the first N sequences of each worker's share

    def __post_init__(self) -> None:
        if isinstance(self.num_negatives, int) and self.num_negatives < 1:
            raise ConfigError(f"eval.num_negatives must be >= 1 or 'all', got {self.num_negatives}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class MlflowSection:
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "autocdsr"
    run_name: str | None = None  # default: <backbone>-<method>-seed<seed>; also names the Ray Train run
    log_model: bool = True
    system_metrics: bool = True

    def __post_init__(self) -> None:
        name = self.run_name
        if name is not None and (not RUN_NAME_RE.fullmatch(name) or ".." in name):
            raise ConfigError(
                f"mlflow.run_name {name!r}: use 1-128 letters, digits, '_', '.', '-' (starting with a letter or "
                "digit, no '..'): it names the checkpoint folder under train.storage_path"
            )


@dataclass(frozen=True)
class RegistrySection:
    name: str | None = "autocdsr"  # registered model name; null: do not register
    alias: str = "candidate"


@dataclass(frozen=True)
class TrainConfig:
    method: Method = "cd"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # AutoCDSR's Pareto solver and the `cd+fixed` weight; `method` here is derived from the top-level key.
    autocdsr: BalancerConfig = field(default_factory=BalancerConfig)
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    registry: RegistrySection = field(default_factory=RegistrySection)

    def __post_init__(self) -> None:
        if self.autocdsr.method != "cd":
            raise ConfigError("autocdsr.method is derived from the top-level `method` key; do not set it")
        if self.model.cd_query_domain == "target" and self.uses_ib_tokens:
            raise ConfigError(
                "model.cd_query_domain=target changes Eq. 5's a_cd of full attention; method=cd+autocdsr_plus "
                "uses Eq. 13 (the mass on IB tokens): leave model.cd_query_domain=input"
            )
        if self.model.cd_query_weights and self.uses_ib_tokens:
            raise ConfigError(
                "model.cd_query_weights weights Eq. 5's a_cd of full attention; method=cd+autocdsr_plus uses "
                "Eq. 13 (the mass on IB tokens): leave model.cd_query_weights empty"
            )
        if self.model.cd_query_average != "rows" and self.uses_ib_tokens:
            raise ConfigError(
                "model.cd_query_average averages Eq. 5's a_cd of full attention; method=cd+autocdsr_plus uses "
                "Eq. 13 (the mass on IB tokens): leave model.cd_query_average=rows"
            )
        if self.gate_active and self.model.cd_query_average != "rows":
            raise ConfigError(
                "autocdsr.gate.enabled=true with method=cd+autocdsr needs model.cd_query_average=rows "
                "(the gate probes each domain's rows on their own)"
            )
        if self.gate_active and self.model.cd_query_weights:
            raise ConfigError(
                "autocdsr.gate.enabled=true with method=cd+autocdsr needs an empty model.cd_query_weights "
                "(the gate sets them)"
            )
        start = self.balancer.start_after
        if self.balancer.method == "autocdsr" and int(start) >= self.train.max_steps:
            via = (
                f"'warmup' = train.warmup_steps = {start}" if self.autocdsr.start_after == "warmup" else start
            )
            raise ConfigError(
                f"method={self.method} would never solve its Pareto weights: autocdsr.start_after ({via}) >= "
                f"train.max_steps ({self.train.max_steps}); lower autocdsr.start_after or train.warmup_steps"
            )

    @property
    def balancer(self) -> BalancerConfig:
        """The balancer for this method: Pareto weights for AutoCDSR(⁺), a fixed w for cd+fixed."""
        kind = {"cd+autocdsr": "autocdsr", "cd+autocdsr_plus": "autocdsr", "cd+fixed": "fixed"}
        start = self.autocdsr.start_after
        return dataclasses.replace(
            self.autocdsr,
            method=kind.get(self.method, "cd"),
            start_after=self.train.warmup_steps if start == "warmup" else start,
        )

    @property
    def gate_active(self) -> bool:
        """The held-out gate runs: enabled, and the method is `cd+autocdsr` (the others ignore it)."""
        return self.autocdsr.gate.enabled and self.method == "cd+autocdsr"

    @property
    def uses_ib_tokens(self) -> bool:
        return self.method == "cd+autocdsr_plus"

    @property
    def run_name(self) -> str:
        return (
            self.mlflow.run_name or f"{self.model.backbone}-{self.method.replace('+', '_')}-seed{self.seed}"
        )

    def to_dict(self) -> dict:
        return configtools.to_dict(self)

    def model_config(
        self, num_items: int, num_domains: int, domains: Sequence[str] | None = None
    ) -> ModelConfig:
        """The model's shape for a dataset's vocabulary; the one place training settings meet the model.
        ``domains``: the vocabulary's domain names in index order (needed when model.cd_query_weights is set)."""
        m = self.model
        weights = None
        if m.cd_query_weights:
            if domains is None or len(domains) != num_domains:
                raise ConfigError("model.cd_query_weights needs the dataset's domain names to resolve")
            unknown = sorted(set(m.cd_query_weights) - set(domains))
            if unknown:
                raise ConfigError(
                    f"model.cd_query_weights names unknown domain(s) {unknown}; the data's domains: {list(domains)}"
                )
            weights = tuple(float(m.cd_query_weights.get(d, 1.0)) for d in domains)
            if not any(weights):
                raise ConfigError("model.cd_query_weights: every domain weighs 0, a_cd would be constant")
        return ModelConfig(
            backbone=m.backbone,
            num_items=num_items,
            num_domains=num_domains,
            max_len=self.data.max_len,
            d_model=m.d_model,
            n_layers=m.n_layers,
            n_heads=m.n_heads,
            dropout=m.dropout,
            temperature=m.temperature,
            loss=m.loss,
            num_sampled=m.num_sampled,
            ib=self.uses_ib_tokens,
            num_ib_tokens=m.num_ib_tokens,
            ib_exchange=m.ib_exchange,
            ib_bucket_ratio=m.ib_bucket_ratio,
            ib_short_row=m.ib_short_row,
            cd_query_domain=m.cd_query_domain,
            cd_query_weights=weights,
            cd_query_average=m.cd_query_average,
        )


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file then ``key=value`` overrides; a key that looks like a credential is refused (ConfigError)."""
    raw = configtools.read_yaml(path) if path is not None else {}
    configtools.apply_overrides(raw, list(overrides or []))
    security.refuse_credential_keys(raw, f"config {path}" if path is not None else "config overrides")
    return configtools.from_dict(TrainConfig, raw)
