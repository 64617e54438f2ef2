"""The model core: SASRec and BERT4Rec backbones, a_cd inside attention (AutoCDSR), IB tokens (AutoCDSR⁺).

model = build_model(cfg, item_domain)           # cfg: ModelConfig, item_domain: [num_items + 1]
out = model(batch)                              # ModelOutput(loss_rec, a_cd, hidden, num_targets)
model.shared_parameters() / model.embedding_parameters()
model.user_embedding(item_idx, domain_idx, target_domain)  -> [B, d] unit vectors
model.item_embeddings()                                    -> [num_items + 1, d] unit vectors
model.recommend(item_idx, domain_idx, target_domain, k, restrict_to_domain=False) -> (scores, items)
model.attention_maps(batch)                                -> per layer [B, H, L, L] (plain attention)
"""

from __future__ import annotations

from typing import Any

import torch

from autocdsr.models.base import ModelOutput, SequenceRecommender
from autocdsr.models.bert4rec import BERT4Rec
from autocdsr.models.config import ModelConfig
from autocdsr.models.sasrec import SASRec

__all__ = [
    "BERT4Rec",
    "ModelConfig",
    "ModelOutput",
    "SASRec",
    "SequenceRecommender",
    "build_model",
]


def build_model(cfg: ModelConfig, item_domain: Any, item_count: Any | None = None) -> SequenceRecommender:
    """The backbone ``cfg.backbone`` names; ``item_count`` (per item_idx) only feeds sampled softmax's proposal."""
    item_domain = torch.as_tensor(item_domain, dtype=torch.long)
    item_count = None if item_count is None else torch.as_tensor(item_count)
    cls = SASRec if cfg.backbone == "sasrec" else BERT4Rec
    return cls(cfg, item_domain, item_count)
