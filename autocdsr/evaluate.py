"""`python -m autocdsr.evaluate --model models:/NAME@ALIAS --data OUT [--split test] [key=value ...]`

Evaluates a registered (or any MLflow) model on a split of the sequence builder's output with the same
protocol as training (eval.* keys override the model's own evaluation settings, e.g.
``eval.num_negatives=all`` for full ranking). Prints the per-domain table and, with --json, the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import mlflow
import numpy as np
import torch

from autocdsr import security, tracking
from autocdsr.configtools import ConfigError, apply_overrides, from_dict
from autocdsr.data.shards import DatasetError, open_dataset
from autocdsr.evaluation import evaluate_split

log = logging.getLogger("autocdsr.evaluate")


def evaluate_model(model_uri: str, data: str, split: str, overrides: list[str]) -> dict[str, float]:
    from autocdsr.config import EvalSection

    recommender = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    info = open_dataset(data)
    # The model's item numbering must be the data's: same items, same order, same domains.
    if (
        info.vocab.domains != tuple(recommender.domains)
        or info.vocab.num_items != len(recommender.item_ids) - 1
    ):
        raise DatasetError(
            f"{data} does not match the model's vocabulary ({info.vocab.num_items} items, domains "
            f"{info.vocab.domains}; model: {len(recommender.item_ids) - 1} items, domains {tuple(recommender.domains)})"
        )
    if not np.array_equal(info.vocab.item_domain[1:], recommender.item_domain[1:]):
        raise DatasetError(f"{data}: items are numbered differently from the model's training data")
    eval_cfg = from_dict(
        EvalSection,
        apply_overrides(dict(recommender.eval_config), [o.removeprefix("eval.") for o in overrides]),
    )
    return evaluate_split(
        recommender.model, info, split, eval_cfg, 0, 1, torch.device("cpu"), recommender.max_len
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m autocdsr.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--model", required=True, help="model URI, e.g. models:/autocdsr@candidate or runs:/ID/model"
    )
    p.add_argument("--data", required=True, help="OUT folder of jobs/build_sequences.py")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("overrides", nargs="*", metavar="eval.KEY=VALUE", help="evaluation overrides")
    args = p.parse_args(argv)
    if any(not o.startswith("eval.") for o in args.overrides):
        log.error("only eval.* keys can be overridden here")
        return 2
    mlflow.set_tracking_uri(tracking.tracking_uri())
    try:
        security.refuse_embedded_credentials(args.model, "--model")
        data = security.check_dataset_folder(args.data)
        metrics = evaluate_model(args.model, data, args.split, args.overrides)
    except (DatasetError, ConfigError) as e:
        log.error("%s", e)
        return 2
    prefix = "val" if args.split == "valid" else "test"
    print(tracking.format_table(metrics, prefix))
    if args.json:
        print(json.dumps(metrics, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
