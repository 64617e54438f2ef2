"""SASRec (Kang & McAuley, 2018): causal self-attention, next-item prediction at every position.

Domain tag of the next position: the hidden state at position t predicts item t+1, so position t also
carries the domain of the item it predicts (a separate "next-domain" embedding added to the token). In
training that is the target's domain; at serving it is the domain the caller asks for, placed on the last
history position. The query's domain is thus an input of the position that answers it, never read from
the answer; it is the only thing position t knows about position t+1.

Which domain is a position's own in a_cd (Eq. 5)? The paper writes d(x_i), the domain of the item at
position i, and shows it on BERT4Rec, whose [MASK] queries carry their target's domain. In SASRec the item
at t and the item it predicts differ in domain at every transition (on KuaiRand 32% of training positions;
93% of `other` and 84% of `type_b` test targets follow an item of another domain), and there the history
of the predicted domain is what Eq. 5 counts as cross-domain. ``ModelConfig.cd_query_domain="target"``
counts each position's mass against the domain it predicts (its next-domain tag) instead; the default
``"input"`` is Eq. 5 as written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autocdsr.models.attention import EncoderOutput
from autocdsr.models.base import Batch, ModelOutput, SequenceRecommender
from autocdsr.models.config import ModelConfig
from autocdsr.models.ib import PLAN_KEY


class SASRec(SequenceRecommender):
    """Batch keys (see `autocdsr.data.batching.sasrec_batch`): item_idx, domain_idx, target_idx and
    target_domain, all [B, L], left-padded; target_idx 0 where a position has nothing to predict."""

    def __init__(
        self, cfg: ModelConfig, item_domain: torch.Tensor, item_count: torch.Tensor | None = None
    ) -> None:
        if cfg.backbone != "sasrec":
            raise ValueError(f"SASRec needs ModelConfig.backbone='sasrec', got {cfg.backbone!r}")
        super().__init__(cfg, item_domain, item_count)
        self.next_domain_emb = nn.Embedding(cfg.num_domains + 1, cfg.d_model, padding_idx=0)
        nn.init.normal_(self.next_domain_emb.weight, std=0.02)
        self.next_domain_emb.weight.data[0].zero_()

    def query_domain(self, batch: Batch) -> torch.Tensor | None:
        """Each position's own domain in Eq. 5 when it is not its item's (``cd_query_domain="target"``: the
        domain it predicts; positions with nothing to predict keep their item's), else None."""
        if self.cfg.cd_query_domain != "target":
            return None
        target = batch["target_domain"]
        return torch.where(target > 0, target, batch["domain_idx"])

    def _encode_batch(self, batch: Batch, need_a_cd: bool, return_maps: bool) -> EncoderOutput:
        next_domain = self.next_domain_emb(batch["target_domain"])
        return self.encode(
            batch["item_idx"],
            batch["domain_idx"],
            next_domain,
            need_a_cd,
            return_maps,
            batch.get(PLAN_KEY),
            self.query_domain(batch),
        )

    def forward(self, batch: Batch, need_a_cd: bool = True) -> ModelOutput:
        out = self._encode_batch(batch, need_a_cd, return_maps=False)
        targets = batch["target_idx"]
        rows = targets != 0
        loss = self.rec_loss(out.hidden[rows], targets[rows])  # Eq. 4 at every position with a next item
        return ModelOutput(loss, out.a_cd, out.hidden, int(rows.sum()))

    def user_embedding(
        self, item_idx: torch.Tensor, domain_idx: torch.Tensor, target_domain: torch.Tensor
    ) -> torch.Tensor:
        """The last position's state, tagged with ``target_domain``; keeps the newest max_len items."""
        item_idx, domain_idx = item_idx[:, -self.cfg.max_len :], domain_idx[:, -self.cfg.max_len :]
        # the next domain of every history position is the following item's; of the last, the request's
        next_domain = torch.cat([domain_idx[:, 1:], target_domain.view(-1, 1).to(domain_idx.dtype)], dim=1)
        next_domain = next_domain * (item_idx != 0)
        out = self.encode(item_idx, domain_idx, self.next_domain_emb(next_domain), need_a_cd=False)
        return F.normalize(out.hidden[:, -1], dim=-1)
