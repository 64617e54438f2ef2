"""An independent, plain-Python implementation of the sequence-builder contract (docs/data-contract.md).

Deliberately written differently from the Spark pipeline (loops over sorted lists, no windows), so that
agreement between the two means something. Used by the end-to-end and property-based tests.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    user_id: str
    domain: str
    item_id: str
    ts: int


@dataclass
class Reference:
    sequences: dict[str, dict]  # sequence_id -> {user_id, chunk, items: [(domain, item_id)], ts: [..]}
    items: dict[tuple[str, str], dict]  # (domain, item_id) -> {item_idx, domain_idx, count}
    domain_idx: dict[str, int]
    duplicates: int
    short: int
    kept: int


def build(events: list[Event], domains: list[str], max_len: int, min_len: int) -> Reference:
    unique = set(events)
    duplicates = len(events) - len(unique)
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in unique:
        by_user[e.user_id].append(e)

    chunks: list[tuple[str, int, list[Event]]] = []
    short = 0
    for user, evs in by_user.items():
        evs.sort(key=lambda e: (e.ts, e.domain, e.item_id))
        cut: list[list[Event]] = []
        end = len(evs)
        while end > 0:  # from the newest end
            start = max(0, end - max_len)
            cut.append(evs[start:end])
            end = start
        cut.reverse()  # oldest first
        kept_chunks = []
        for c in cut:
            if len(c) < min_len:
                short += len(c)
            else:
                kept_chunks.append(c)
        for k, c in enumerate(kept_chunks):
            chunks.append((user, k, c))

    domain_idx = {d: i for i, d in enumerate(sorted(set(domains)), start=1)}
    counts = Counter((e.domain, e.item_id) for _, _, c in chunks for e in c)
    ordered = sorted(counts, key=lambda key: (domain_idx[key[0]], -counts[key], key[1]))
    items = {
        key: {"item_idx": i, "domain_idx": domain_idx[key[0]], "count": counts[key]}
        for i, key in enumerate(ordered, start=1)
    }
    sequences = {
        f"{user}:{k}": {
            "user_id": user,
            "chunk": k,
            "item_idx": [items[(e.domain, e.item_id)]["item_idx"] for e in c],
            "domain_idx": [domain_idx[e.domain] for e in c],
            "timestamp": [e.ts for e in c],
        }
        for user, k, c in chunks
    }
    kept = sum(len(c) for _, _, c in chunks)
    return Reference(sequences, items, domain_idx, duplicates, short, kept)
