"""BERT4Rec (Sun et al., 2019): bidirectional self-attention trained by cloze (masked item) prediction.

A masked position keeps its domain tag (the hidden item's domain, i.e. the target's), so the model knows
in which domain it is asked to predict. At serving a [MASK] tagged with the requested domain is appended
after the history and its final state is the user embedding (the paper's readout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autocdsr.models.attention import EncoderOutput
from autocdsr.models.base import Batch, ModelOutput, SequenceRecommender
from autocdsr.models.config import ModelConfig
from autocdsr.models.ib import PLAN_KEY


class BERT4Rec(SequenceRecommender):
    """Batch keys (see `autocdsr.data.batching.cloze_batch`): item_idx with [MASK] = num_items + 1 at masked
    positions, domain_idx (unchanged by masking), target_idx (the hidden item, 0 elsewhere), all [B, L]."""

    def __init__(
        self, cfg: ModelConfig, item_domain: torch.Tensor, item_count: torch.Tensor | None = None
    ) -> None:
        if cfg.backbone != "bert4rec":
            raise ValueError(f"BERT4Rec needs ModelConfig.backbone='bert4rec', got {cfg.backbone!r}")
        super().__init__(cfg, item_domain, item_count)

    def _encode_batch(self, batch: Batch, need_a_cd: bool, return_maps: bool) -> EncoderOutput:
        return self.encode(
            batch["item_idx"], batch["domain_idx"], None, need_a_cd, return_maps, batch.get(PLAN_KEY)
        )

    def forward(self, batch: Batch, need_a_cd: bool = True) -> ModelOutput:
        out = self._encode_batch(batch, need_a_cd, return_maps=False)
        targets = batch["target_idx"]
        rows = targets != 0
        loss = self.rec_loss(out.hidden[rows], targets[rows])  # Eq. 4 at the masked positions
        return ModelOutput(loss, out.a_cd, out.hidden, int(rows.sum()))

    def user_embedding(
        self, item_idx: torch.Tensor, domain_idx: torch.Tensor, target_domain: torch.Tensor
    ) -> torch.Tensor:
        """Append [MASK] tagged ``target_domain`` to the newest max_len - 1 history items; its state, normalised."""
        keep = self.cfg.max_len - 1
        item_idx, domain_idx = item_idx[:, -keep:], domain_idx[:, -keep:]
        mask = torch.full_like(item_idx[:, :1], self.cfg.mask_token)
        item_idx = torch.cat([item_idx, mask], dim=1)
        domain_idx = torch.cat([domain_idx, target_domain.view(-1, 1).to(domain_idx.dtype)], dim=1)
        out = self.encode(item_idx, domain_idx, None, need_a_cd=False)
        return F.normalize(out.hidden[:, -1], dim=-1)
