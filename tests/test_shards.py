"""Reading the builder's output: contract checks, vocabularies, padding, exact eval sharding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autocdsr.data import shards


def test_open_dataset_loads_vocabulary(synth_dataset: Path) -> None:
    info = shards.open_dataset(str(synth_dataset))
    v = info.vocab
    items = pq.read_table(synth_dataset / "items").to_pylist()
    assert v.num_items == len(items) == info.manifest["counts"]["items"]
    assert v.domains == ("books", "games", "movies", "noise")
    for it in items[:50] + items[-50:]:
        assert (
            v.item_domain[it["item_idx"]] == it["domain_idx"] and v.item_count[it["item_idx"]] == it["count"]
        )
    assert v.item_domain[0] == 0 and v.domain_idx("movies") == 3
    lo, hi = v.domain_ranges["games"]
    assert set(v.item_domain[lo : hi + 1].tolist()) == {2}
    with pytest.raises(KeyError, match="unknown domain 'nope'"):
        v.domain_idx("nope")
    assert len(info.manifest_sha256) == 64


def test_open_dataset_refuses_incomplete_or_unknown_versions(synth_dataset: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(synth_dataset, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(shards.DatasetError, match="schema_version 99 is not supported"):
        shards.open_dataset(str(copy))
    (copy / "_SUCCESS").unlink()
    with pytest.raises(shards.DatasetError, match="no _SUCCESS marker"):
        shards.open_dataset(str(copy))
    with pytest.raises(shards.DatasetError, match="does not exist"):
        shards.open_dataset(str(tmp_path / "missing"))


def test_list_arrays_matches_to_pylist() -> None:
    rng = np.random.default_rng(0)
    lists = [rng.integers(1, 100, size=n).tolist() for n in (0, 1, 5, 8, 13, 3)]
    arr = pa.chunked_array(
        [pa.array(lists[:2], pa.list_(pa.int32())), pa.array(lists[2:], pa.list_(pa.int32()))]
    )
    assert [a.tolist() for a in shards.list_arrays(arr)] == lists
    sliced = pa.array(lists, pa.list_(pa.int32())).slice(2, 3)  # offsets not starting at 0
    assert [a.tolist() for a in shards.list_arrays(sliced)] == lists[2:5]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_rows_are_split_disjoint_and_complete(synth_dataset: Path, world: int) -> None:
    info = shards.open_dataset(str(synth_dataset))
    everything = pq.read_table(synth_dataset / "test").column("sequence_id").to_pylist()
    seen: list[str] = []
    for rank in range(world):
        for batch in shards.iter_eval_rows(info, "test", rank, world, batch_size=37):
            seen += batch.column("sequence_id").to_pylist()
    assert sorted(seen) == sorted(everything) and len(set(seen)) == len(seen)
    assert len(shards.list_split_files(info, "test")) > 1  # several shards really exercised
