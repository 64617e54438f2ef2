"""An independent, plain-Python implementation of the sequence-builder contract (docs/data-contract.md).

Deliberately written differently from the Spark pipeline (loops over sorted lists, no windows), so that
agreement between the two means something. Used by the end-to-end and property-based tests.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation, localcontext


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


# ---------------------------------------------------------------- validation (docs/data-contract.md, "rejected")
# A number as the contract reads it: optional sign, digits with an optional point (or a point and digits),
# optional exponent; e.g. "1700000000", "1700000000.5", "1.7E9", "+5", ".5", "5.".
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_CONTROL = "".join(chr(c) for c in range(33))  # space and control characters, trimmed around numbers
_DECIMAL = Context(prec=100, Emax=10**6, Emin=-(10**6))
MAX_ABS_MS = 2**62


def parse_timestamp_ms(text: str, unit: str) -> int | None:
    """A numeric timestamp (unit ``s``, ``ms`` or ``ordinal``) in ms (``ordinal``: as is), or None when it does not
    parse: rounded half-up to 6 decimals, at most 32 digits before the point (also after x1000 for ``s``),
    within +-2**62, then floored."""
    text = text.strip(_CONTROL)
    if not _NUMBER.fullmatch(text):
        return None
    with localcontext(_DECIMAL):
        try:
            value = Decimal(text).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)
        except InvalidOperation:  # too many digits for the quantum: far beyond any bound below
            return None
        if unit == "s":
            value *= 1000
        if abs(value) >= Decimal(10) ** 32 or abs(value) > MAX_ABS_MS:
            return None
        return math.floor(value)


def reject_reason(
    row: dict[str, str | None],
    unit: str,
    reference_ms: int,
    max_future_s: int,
    min_ms: int | None,
) -> tuple[str | None, int | None]:
    """(reason or None, ts in ms) of one raw row with keys ``user_id, item_id, timestamp, raw_domain, domain``
    (``domain`` None: the config drops the raw domain) and ``malformed_record``, by the contract's first-match
    rules. Ids and timestamps are trimmed of spaces; numbers also of other control characters."""

    def blank(v: str | None) -> bool:
        return v is None or v.strip(" ") == ""

    user, item, ts_text = row["user_id"], row["item_id"], row["timestamp"]
    ts = None if ts_text is None else parse_timestamp_ms(ts_text.strip(" "), unit)
    clock = unit != "ordinal"
    checks = [
        ("malformed_record", row["malformed_record"] is not None),
        ("missing_user_id", blank(user)),
        ("missing_item_id", blank(item)),
        ("missing_domain", blank(row["raw_domain"])),
        ("invalid_encoding", "\ufffd" in (user or "") + (item or "")),
        ("missing_timestamp", blank(ts_text)),
        ("unparseable_timestamp", ts is None),
        ("negative_timestamp", ts is not None and ts < 0),
        ("early_timestamp", clock and min_ms is not None and ts is not None and ts < min_ms),
        ("future_timestamp", clock and ts is not None and ts > reference_ms + max_future_s * 1000),
        ("unmapped_domain", row["domain"] is None),
    ]
    return next((name for name, hit in checks if hit), None), ts
