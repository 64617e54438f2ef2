"""What SASRec and BERT4Rec share: embeddings, the encoder (plain or AutoCDSR⁺), the loss, retrieval.

Every position carries item + domain + learned position embeddings (Eq. 2: H + P). Positions are right-
aligned (the newest slot is always max_len - 1), so how much left padding a batch has never changes a
sequence's positions. Scores are cosine / temperature everywhere (Eq. 4): in the loss, in `recommend`, and
implicitly in `user_embedding` / `item_embeddings`, which are unit vectors.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autocdsr.models.attention import Encoder, EncoderOutput
from autocdsr.models.config import ModelConfig
from autocdsr.models.ib import IBEncoder, LayoutPlan
from autocdsr.objectives.losses import full_softmax_loss, sampled_softmax_loss, sampling_log_q

# tensors by key; a batch from the training data path may also carry the AutoCDSR⁺ packing plan under
# `ib.PLAN_KEY` (a `LayoutPlan`, on the host)
Batch = dict[str, torch.Tensor | LayoutPlan]


@dataclass
class ModelOutput:
    loss_rec: torch.Tensor  # scalar: mean Eq. 4 loss over the batch's target positions
    a_cd: torch.Tensor | None  # scalar with grad: Eq. 5 (plain) or Eq. 13 (AutoCDSR⁺); None if not asked for
    hidden: torch.Tensor  # [B, L, d] final states (before normalisation)
    num_targets: int  # target positions the loss averages over


class SequenceRecommender(nn.Module):
    """Base class; subclasses define the input tokens (`forward`) and the query position (`user_embedding`)."""

    def __init__(
        self, cfg: ModelConfig, item_domain: torch.Tensor, item_count: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        item_domain = torch.as_tensor(item_domain, dtype=torch.long)
        if item_domain.shape != (cfg.num_items + 1,):
            raise ValueError(
                f"item_domain must have shape [num_items + 1] = [{cfg.num_items + 1}], got {tuple(item_domain.shape)}"
            )
        if item_domain[0] != 0 or item_domain[1:].min() < 1 or item_domain.max() > cfg.num_domains:
            raise ValueError(
                f"item_domain must be 0 for padding and in 1..{cfg.num_domains} for items 1..{cfg.num_items}"
            )
        self.cfg = cfg
        self.register_buffer("item_domain", item_domain, persistent=False)
        if cfg.loss == "sampled":
            counts = torch.zeros(cfg.num_items + 1) if item_count is None else torch.as_tensor(item_count)
            self.register_buffer("log_q", sampling_log_q(counts), persistent=False)
        d = cfg.d_model
        # BERT4Rec's [MASK] is item num_items + 1; it is an input token only, never a retrieval candidate.
        vocab = cfg.num_items + 1 + (1 if cfg.backbone == "bert4rec" else 0)
        self.item_emb = nn.Embedding(vocab, d, padding_idx=0)
        self.domain_emb = nn.Embedding(cfg.num_domains + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.ln_input = nn.Identity() if cfg.norm_first else nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = IBEncoder(cfg) if cfg.ib else Encoder(cfg)
        self.apply(_init_weights)
        self.query_weights: tuple[float, ...] | None = cfg.cd_query_weights

    def set_query_weights(self, weights: Sequence[float] | None) -> None:
        """Weights of a_cd's query rows by their own domain (1..D) from now on: what
        `ModelConfig.cd_query_weights` sets at build time, changed during training by the held-out gate
        (`autocdsr.objectives.gate`). None: Eq. 5 as written. Full-attention models only."""
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if self.cfg.ib:
                raise ValueError("query weights weight Eq. 5's a_cd; with ib=True a_cd is Eq. 13")
            if len(weights) != self.cfg.num_domains or not all(math.isfinite(w) and w >= 0 for w in weights):
                raise ValueError(
                    f"query weights must be {self.cfg.num_domains} finite weights >= 0, got {weights}"
                )
        self.query_weights = weights

    # -- parameter groups (the Pareto solver differentiates w.r.t. the shared, non-embedding ones) ---------

    def embedding_parameters(self) -> Iterator[nn.Parameter]:
        """Lookup tables: items, domains, positions, domain tags, AutoCDSR⁺'s initial IB tokens."""
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                yield from module.parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Everything else (attention, FFN, LayerNorms): the θ of Eq. 8-12."""
        emb = {id(p) for p in self.embedding_parameters()}
        return (p for p in self.parameters() if id(p) not in emb)

    # -- encoding -------------------------------------------------------------------------------------------

    def input_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.ln_input(x))

    def encode(
        self,
        item_idx: torch.Tensor,
        domain_idx: torch.Tensor,
        extra: torch.Tensor | None = None,
        need_a_cd: bool = True,
        return_maps: bool = False,
        plan: LayoutPlan | None = None,
        query_domain: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Token embeddings (+ ``extra``, e.g. SASRec's next-domain tag) -> encoder. Item 0 is padding.
        ``plan``: the AutoCDSR⁺ packing plan of these inputs, when the data path built one (else the IB
        encoder builds it; the plain encoder ignores it). ``query_domain``: each position's own domain in
        Eq. 5 when it is not its item's (plain encoder only; `ModelConfig.cd_query_domain`)."""
        L = item_idx.shape[1]
        if self.cfg.max_len < L:
            raise ValueError(f"input length {L} exceeds ModelConfig.max_len={self.cfg.max_len}")
        valid = item_idx != 0
        positions = torch.arange(self.cfg.max_len - L, self.cfg.max_len, device=item_idx.device)
        x = self.item_emb(item_idx) + self.domain_emb(domain_idx) + self.pos_emb(positions)  # H + P, Eq. 2
        if extra is not None:
            x = x + extra
        x = self.input_norm(x)
        if isinstance(self.encoder, IBEncoder):
            if return_maps:
                raise NotImplementedError("attention maps are available for full-attention models only")
            return self.encoder(x, domain_idx, valid, self.input_norm, need_a_cd, plan)
        return self.encoder(x, domain_idx, valid, need_a_cd, return_maps, query_domain, self.query_weights)

    # -- loss and retrieval --------------------------------------------------------------------------------

    def rec_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Eq. 4 over the rows of ``hidden`` [N, d] with targets [N]."""
        items = self.item_emb.weight[: self.cfg.num_items + 1]
        if self.cfg.loss == "sampled":
            return sampled_softmax_loss(
                hidden, items, targets, self.cfg.temperature, self.log_q, self.cfg.num_sampled
            )
        return full_softmax_loss(hidden, items, targets, self.cfg.temperature)

    def item_embeddings(self) -> torch.Tensor:
        """[num_items + 1, d] unit vectors (row 0, padding, is zero): dot product with a user = cosine."""
        return F.normalize(self.item_emb.weight[: self.cfg.num_items + 1], dim=-1)

    def user_embedding(
        self, item_idx: torch.Tensor, domain_idx: torch.Tensor, target_domain: torch.Tensor
    ) -> torch.Tensor:
        """History [B, L] (left-padded) + the domain to recommend in [B] -> unit vectors [B, d]."""
        raise NotImplementedError

    @torch.no_grad()
    def recommend(
        self,
        item_idx: torch.Tensor,
        domain_idx: torch.Tensor,
        target_domain: torch.Tensor,
        k: int,
        restrict_to_domain: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items by cosine / temperature -> (scores [B, k], item_idx [B, k]), best first.

        Never returns padding 0; with ``restrict_to_domain`` only items of each row's ``target_domain``.
        """
        scores = self.user_embedding(item_idx, domain_idx, target_domain) @ self.item_embeddings().T
        scores = scores / self.cfg.temperature
        allowed = torch.ones_like(scores, dtype=torch.bool)
        allowed[:, 0] = False
        if restrict_to_domain:
            allowed &= self.item_domain[None, :] == target_domain[:, None]
        smallest = int(allowed.sum(dim=1).min()) if len(scores) else k
        if k > smallest:
            raise ValueError(f"k={k} exceeds the {smallest} candidate items available to some row")
        return scores.masked_fill(~allowed, float("-inf")).topk(k, dim=1)

    @torch.no_grad()
    def attention_maps(self, batch: Batch) -> list[torch.Tensor]:
        """Per-layer attention probabilities [B, H, L, L] for ``batch`` (slow; full-attention models only).

        Padding rows and columns are 0; rows sum to 1 elsewhere. For analysis plots such as cross-domain
        attention by domain pair (`attention.a_cd_from_maps` reproduces a_cd from them).
        """
        out = self._encode_batch(batch, need_a_cd=False, return_maps=True)
        return out.maps

    def _encode_batch(self, batch: Batch, need_a_cd: bool, return_maps: bool) -> EncoderOutput:
        raise NotImplementedError


def _init_weights(module: nn.Module) -> None:
    # BERT / GPT-2 initialisation; the padding rows of lookups stay zero
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
