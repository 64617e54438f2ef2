"""`ModelConfig`: everything that fixes a model's shape and forward pass, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Backbone = Literal["sasrec", "bert4rec"]
LossKind = Literal["full", "sampled"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of one SASRec / BERT4Rec model, with or without AutoCDSR⁺ IB tokens.

    Paper defaults (App. A.1): d_model = 32, 6 layers, 4 heads. AutoCDSR (Eq. 5) needs nothing here: every
    model computes a_cd inside its attention; AutoCDSR⁺ (Eq. 13-14) is ``ib=True``.
    """

    backbone: Backbone
    num_items: int  # item_idx runs 1..num_items; 0 is padding (BERT4Rec adds [MASK] = num_items + 1)
    num_domains: int  # domain_idx runs 1..num_domains; 0 is padding
    max_len: int = 200  # longest input; positions are right-aligned so the newest item is always max_len - 1
    d_model: int = 32
    n_layers: int = 6
    n_heads: int = 4
    d_ff: int | None = None  # feed-forward width; None = 4 * d_model
    dropout: float = (
        0.1  # on embeddings, attention output and FFN (not on attention probabilities, see attention.py)
    )
    norm_first: bool = False  # False: post-LN as written in Eq. 3 (BERT); True: pre-LN (GPT-2)
    temperature: float = 0.05  # Eq. 4: logits are cosine / temperature
    loss: LossKind = "full"  # full softmax over all items (Eq. 4) or sampled softmax with logQ correction
    num_sampled: int = 4096  # negatives per batch for loss="sampled"
    ib: bool = False  # AutoCDSR⁺: per-domain attention + information-bottleneck tokens (ib.py)
    num_ib_tokens: int = 1  # T, IB tokens per domain (causal: per domain run); the paper does not give T.
    # 1: quality of 2 within seed noise at 0.88x its step time (SASRec 128x200), docs/benchmarks.md
    ib_exchange: bool = True  # Eq. 14 on (sum across domains) or off (domains fully isolated)
    # AutoCDSR⁺'s packed per-domain rows (ib.py): rows within this factor of a bucket's longest row share one
    # attention call, and rows of at most ib_short_row tokens all share one. The defaults are this project's
    # CPU optimum (docs/benchmarks.md: padding costs compute there, a call little); on a GPU, where a kernel
    # launch costs more than padding, coarser buckets (e.g. 2.0 and 64) are the setting to try. Outputs do not
    # depend on it beyond float rounding.
    ib_bucket_ratio: float = 2**0.25
    ib_short_row: int = 32
    # SASRec's a_cd (Eq. 5): a position's own domain is its item's ("input", as written) or the domain of the
    # item it predicts ("target"); see sasrec.py. The same for BERT4Rec, whose masked queries carry their
    # target's domain either way.
    cd_query_domain: Literal["input", "target"] = "input"
    # Per domain 1..D, the weight of a query row's cross-domain mass in a_cd by the row's own domain; None = 1
    # everywhere (Eq. 5). a_cd stays a mean over all valid rows. Full attention only.
    cd_query_weights: tuple[float, ...] | None = None
    # How a_cd averages its query rows: "rows" = the mean over all valid rows (Eq. 5 as written), "domains" =
    # the mean over the batch's query domains of each domain's row mean, so that a majority domain's rows do
    # not carry most of the constraint (docs/results.md, "A domain-balanced a_cd"). Full attention only.
    cd_query_average: Literal["rows", "domains"] = "rows"

    def __post_init__(self) -> None:
        if self.backbone not in ("sasrec", "bert4rec"):
            raise ValueError(f"ModelConfig.backbone must be 'sasrec' or 'bert4rec', got {self.backbone!r}")
        for name in (
            "num_items",
            "num_domains",
            "d_model",
            "n_layers",
            "n_heads",
            "num_ib_tokens",
            "num_sampled",
            "ib_short_row",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.ib_bucket_ratio, bool) or not (
            isinstance(self.ib_bucket_ratio, int | float) and self.ib_bucket_ratio > 1
        ):
            raise ValueError(
                f"ModelConfig.ib_bucket_ratio must be a number > 1, got {self.ib_bucket_ratio!r}"
            )
        if self.max_len < 2:
            raise ValueError(f"ModelConfig.max_len must be >= 2, got {self.max_len}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by ModelConfig.n_heads ({self.n_heads})"
            )
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"ModelConfig.d_ff must be >= 1 or None, got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.temperature > 0:
            raise ValueError(f"ModelConfig.temperature must be > 0, got {self.temperature}")
        if self.loss not in ("full", "sampled"):
            raise ValueError(f"ModelConfig.loss must be 'full' or 'sampled', got {self.loss!r}")
        if self.cd_query_domain not in ("input", "target"):
            raise ValueError(
                f"ModelConfig.cd_query_domain must be 'input' or 'target', got {self.cd_query_domain!r}"
            )
        if self.cd_query_domain == "target" and self.ib:
            raise ValueError(
                "ModelConfig.cd_query_domain='target' changes Eq. 5's a_cd of full attention; with ib=True "
                "a_cd is Eq. 13 (the mass on IB tokens)"
            )
        if self.cd_query_weights is not None:
            w = self.cd_query_weights
            if len(w) != self.num_domains or not all(math.isfinite(x) and x >= 0 for x in w):
                raise ValueError(
                    f"ModelConfig.cd_query_weights must hold num_domains = {self.num_domains} finite weights >= 0, "
                    f"got {w!r}"
                )
            if self.ib:
                raise ValueError(
                    "ModelConfig.cd_query_weights weights Eq. 5's a_cd; with ib=True a_cd is Eq. 13"
                )
        if self.cd_query_average not in ("rows", "domains"):
            raise ValueError(
                f"ModelConfig.cd_query_average must be 'rows' or 'domains', got {self.cd_query_average!r}"
            )
        if self.cd_query_average == "domains" and self.ib:
            raise ValueError(
                "ModelConfig.cd_query_average='domains' averages Eq. 5's a_cd; with ib=True a_cd is Eq. 13"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def causal(self) -> bool:
        """SASRec predicts the next item at every position, so position t may only see positions <= t."""
        return self.backbone == "sasrec"

    @property
    def mask_token(self) -> int:
        """BERT4Rec's [MASK] item index, one past the last real item."""
        return self.num_items + 1
