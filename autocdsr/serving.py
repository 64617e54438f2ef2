"""The MLflow pyfunc model: raw histories in, top-k raw item ids out.

Input (a pandas DataFrame, one row per request):
    item_ids: list[str]       the user's history, oldest first
    domains: list[str]        each history item's domain
    target_domain: str        the domain to recommend in
Params: ``k`` (default 10), ``restrict_to_domain`` (default true: only items of target_domain).
Output: ``item_ids: list[str]`` and ``scores: list[float]`` (cosine / temperature), best first.

History items unknown to the model (new items) are dropped; an unknown target domain is an error.
Loading reads a JSON config, a Parquet item table and a weights file with ``torch.load(weights_only=True)``
— no pickled Python objects beyond what MLflow itself stores for the pyfunc wrapper.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

INPUT_SCHEMA = Schema(
    [
        ColSpec(Array("string"), "item_ids"),
        ColSpec(Array("string"), "domains"),
        ColSpec("string", "target_domain"),
    ]
)
OUTPUT_SCHEMA = Schema([ColSpec(Array("string"), "item_ids"), ColSpec(Array("double"), "scores")])
PARAMS = ParamSchema([ParamSpec("k", "long", 10), ParamSpec("restrict_to_domain", "boolean", True)])
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA, params=PARAMS)


class Recommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from autocdsr.config import TrainConfig
        from autocdsr.configtools import from_dict
        from autocdsr.models import build_model

        meta = json.loads(Path(context.artifacts["config"]).read_text())
        cfg = from_dict(TrainConfig, meta["config"])
        items = pq.read_table(context.artifacts["items"]).sort_by("item_idx")
        self.domains: list[str] = meta["domains"]
        n = items.num_rows
        self.item_ids = np.array(["", *items.column("item_id").to_pylist()], dtype=object)
        item_domain = np.zeros(n + 1, dtype=np.int64)
        item_domain[1:] = items.column("domain_idx").to_numpy()
        self.lookup = {
            (d, i): k
            for k, (d, i) in enumerate(
                zip(items.column("domain").to_pylist(), items.column("item_id").to_pylist(), strict=True),
                start=1,
            )
        }
        self.max_len = cfg.data.max_len
        self.item_domain = item_domain
        self.eval_config = dataclasses.asdict(cfg.eval)
        self.model = build_model(
            cfg.model_config(n, len(self.domains), self.domains), torch.as_tensor(item_domain)
        )
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def _encode(self, row: pd.Series) -> tuple[list[int], list[int]]:
        items, doms = [], []
        for item, dom in zip(row["item_ids"], row["domains"], strict=True):
            idx = self.lookup.get((dom, str(item)))
            if idx is not None:
                items.append(idx)
                doms.append(self.domains.index(dom) + 1)
        return items[-self.max_len :], doms[-self.max_len :]

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        params = params or {}
        k = int(params.get("k", 10))
        restrict = bool(params.get("restrict_to_domain", True))
        unknown = sorted(set(model_input["target_domain"]) - set(self.domains))
        if unknown:
            raise ValueError(f"unknown target_domain {unknown}; known: {self.domains}")
        batch_items = np.zeros((len(model_input), self.max_len), dtype=np.int64)
        batch_doms = np.zeros_like(batch_items)
        for r, (_, row) in enumerate(model_input.iterrows()):
            items, doms = self._encode(row)
            if items:
                batch_items[r, -len(items) :] = items
                batch_doms[r, -len(doms) :] = doms
        target = torch.as_tensor([self.domains.index(d) + 1 for d in model_input["target_domain"]])
        with torch.no_grad():
            scores, idx = self.model.recommend(
                torch.as_tensor(batch_items),
                torch.as_tensor(batch_doms),
                target,
                k,
                restrict_to_domain=restrict,
            )
        return pd.DataFrame(
            {
                "item_ids": [self.item_ids[row].tolist() for row in idx.numpy()],
                "scores": [row.astype(float).tolist() for row in scores.float().numpy()],
            }
        )


def input_example(domains: list[str], items_by_domain: dict[str, list[str]]) -> pd.DataFrame:
    """A small valid request built from real item ids (MLflow validates it at log time)."""
    hist_items, hist_domains = [], []
    for d in domains:
        for item in items_by_domain.get(d, [])[:2]:
            hist_items.append(item)
            hist_domains.append(d)
    return pd.DataFrame({"item_ids": [hist_items], "domains": [hist_domains], "target_domain": [domains[0]]})
