"""Seeded generator of realistic multi-domain interaction logs.

`python -m autocdsr.synth --out DIR` writes ``DIR/<domain>/part-00000.<ext>`` with columns
``user_id, item_id, timestamp`` (epoch seconds), the input layout `jobs/build_sequences.py` reads.

What the data carries, so that models have something to find:
- domains of different sizes and shares of traffic, with Zipf-skewed item popularity;
- users active in several domains (a Dirichlet mix of domain affinities per user);
- a planted cross-domain signal: with probability ``p_cross`` the next item in domain *b* is a fixed
  function (``link[a][b]``) of the user's last item in another signal domain *a*;
- a planted within-domain signal: with probability ``p_seq`` the next item follows the last item of the
  same domain through a fixed "sequel" map;
- one noise domain whose items are drawn from popularity alone: it predicts nothing and nothing
  predicts it. Its events do not reset the "last item" state, so they only dilute the sequence;
- realistic defects: same-second ties and a small rate of exact duplicate rows.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

FORMATS = ("csv", "parquet", "jsonl", "mixed")


@dataclass(frozen=True)
class DomainSpec:
    name: str
    n_items: int
    share: float  # expected share of a user's events before per-user variation
    noise: bool = False


DEFAULT_DOMAINS: tuple[DomainSpec, ...] = (
    DomainSpec("books", 3000, 0.40),
    DomainSpec("movies", 1500, 0.27),
    DomainSpec("games", 600, 0.15),
    DomainSpec("noise", 2000, 0.18, noise=True),
)


@dataclass(frozen=True)
class SynthConfig:
    users: int = 2000
    seed: int = 0
    domains: tuple[DomainSpec, ...] = DEFAULT_DOMAINS
    mean_events: float = 40.0  # mean events per user (log-normal, heavy tail)
    sigma_events: float = 0.8
    min_events: int = 5
    p_cross: float = 0.45
    p_seq: float = 0.25
    zipf_s: float = 1.05
    dirichlet_concentration: float = 1.5
    tie_rate: float = 0.03  # event shares its timestamp with the previous one
    duplicate_rate: float = 0.005  # event row written twice
    start_epoch_s: int = 1_672_531_200  # 2023-01-01T00:00:00Z
    mean_gap_s: float = 36_000.0

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError(f"users must be >= 1, got {self.users}")
        if not any(not d.noise for d in self.domains):
            raise ValueError("at least one signal (non-noise) domain is required")
        if len({d.name for d in self.domains}) != len(self.domains):
            raise ValueError("domain names must be unique")
        for p_name in ("p_cross", "p_seq", "tie_rate", "duplicate_rate"):
            p = getattr(self, p_name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{p_name} must be in [0, 1], got {p}")
        if self.p_cross + self.p_seq > 1.0:
            raise ValueError("p_cross + p_seq must be <= 1")


def _zipf_probs(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


@dataclass
class _World:
    """The fixed, user-independent structure: popularity, sequel maps and cross-domain links."""

    cfg: SynthConfig
    popularity: list[np.ndarray]
    sequel: list[np.ndarray]
    link: dict[tuple[int, int], np.ndarray]

    @classmethod
    def build(cls, cfg: SynthConfig, rng: np.random.Generator) -> _World:
        popularity, sequel = [], []
        for d in cfg.domains:
            popularity.append(_zipf_probs(d.n_items, cfg.zipf_s))
            sequel.append(rng.permutation(d.n_items))
        signal = [i for i, d in enumerate(cfg.domains) if not d.noise]
        link = {}
        for a in signal:
            for b in signal:
                if a != b:
                    # Popular items of `a` map to (mostly) popular items of `b`, shuffled locally, so the
                    # signal is learnable yet not identical to popularity.
                    n_a, n_b = cfg.domains[a].n_items, cfg.domains[b].n_items
                    base = (np.arange(n_a) * n_b) // n_a
                    jitter = rng.integers(-25, 26, size=n_a)
                    link[(a, b)] = np.clip(base + jitter, 0, n_b - 1)
        return cls(cfg, popularity, sequel, link)


def generate(cfg: SynthConfig) -> pd.DataFrame:
    """Return the event log as a DataFrame: user_id, item_id, timestamp (epoch s), domain."""
    rng = np.random.default_rng(cfg.seed)
    world = _World.build(cfg, rng)
    n_dom = len(cfg.domains)
    shares = np.array([d.share for d in cfg.domains], dtype=np.float64)
    shares /= shares.sum()
    is_noise = np.array([d.noise for d in cfg.domains])

    mu = math.log(cfg.mean_events) - cfg.sigma_events**2 / 2
    lengths = np.maximum(cfg.min_events, rng.lognormal(mu, cfg.sigma_events, cfg.users).astype(np.int64))
    users_col: list[np.ndarray] = []
    items_col: list[np.ndarray] = []
    doms_col: list[np.ndarray] = []
    ts_col: list[np.ndarray] = []

    for u in range(cfg.users):
        n = int(lengths[u])
        affinity = rng.dirichlet(shares * cfg.dirichlet_concentration * n_dom)
        doms = rng.choice(n_dom, size=n, p=affinity)
        mode = rng.random(n)
        items = np.empty(n, dtype=np.int64)
        last_item = np.full(n_dom, -1, dtype=np.int64)  # last item seen per domain
        last_signal_dom = -1
        for t in range(n):
            d = doms[t]
            if is_noise[d]:
                items[t] = rng.choice(cfg.domains[d].n_items, p=world.popularity[d])
                continue
            if mode[t] < cfg.p_cross and last_signal_dom >= 0 and last_signal_dom != d:
                item = world.link[(last_signal_dom, d)][last_item[last_signal_dom]]
            elif mode[t] < cfg.p_cross + cfg.p_seq and last_item[d] >= 0:
                item = world.sequel[d][last_item[d]]
            else:
                item = rng.choice(cfg.domains[d].n_items, p=world.popularity[d])
            items[t] = item
            last_item[d] = item
            last_signal_dom = d
        gaps = rng.exponential(cfg.mean_gap_s, size=n).astype(np.int64) + 1
        gaps[rng.random(n) < cfg.tie_rate] = 0
        start = cfg.start_epoch_s + int(rng.integers(0, 365 * 86_400))
        ts = start + np.cumsum(gaps)
        users_col.append(np.full(n, u, dtype=np.int64))
        items_col.append(items)
        doms_col.append(doms)
        ts_col.append(ts)

    users = np.concatenate(users_col)
    items = np.concatenate(items_col)
    doms = np.concatenate(doms_col)
    ts = np.concatenate(ts_col)
    if cfg.duplicate_rate > 0:
        dup = np.flatnonzero(rng.random(len(users)) < cfg.duplicate_rate)
        users, items, doms, ts = (np.concatenate([a, a[dup]]) for a in (users, items, doms, ts))

    names = np.array([d.name for d in cfg.domains])
    frame = pd.DataFrame(
        {
            "user_id": pd.Series(users).map(lambda u: f"u{u:07d}"),
            "item_id": [f"{names[d][:3]}{i:06d}" for d, i in zip(doms, items, strict=True)],
            "timestamp": ts,
            "domain": names[doms],
        }
    )
    # Logs arrive in no particular order: shuffle so that nothing downstream can rely on file order.
    return frame.sample(frac=1.0, random_state=cfg.seed).reset_index(drop=True)


def write_logs(frame: pd.DataFrame, out: Path, fmt: str = "csv") -> dict[str, int]:
    """Write ``out/<domain>/part-00000.<ext>``; with ``mixed`` each domain gets another format."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    counts: dict[str, int] = {}
    for k, (domain, part) in enumerate(sorted(frame.groupby("domain"), key=lambda kv: kv[0])):
        domain_fmt = ("csv", "parquet", "jsonl")[k % 3] if fmt == "mixed" else fmt
        folder = out / str(domain)
        folder.mkdir(parents=True, exist_ok=True)
        rows = part[["user_id", "item_id", "timestamp"]]
        if domain_fmt == "csv":
            rows.to_csv(folder / "part-00000.csv", index=False)
        elif domain_fmt == "parquet":
            rows.to_parquet(folder / "part-00000.parquet", index=False)
        else:
            rows.to_json(folder / "part-00000.jsonl", orient="records", lines=True)
        counts[str(domain)] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m autocdsr.synth",
        description="Generate seeded multi-domain interaction logs (the quickstart data and test fixture).",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder; gets one sub-folder per domain")
    p.add_argument(
        "--users", type=int, default=SynthConfig.users, help="number of users (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=SynthConfig.seed, help="random seed (default %(default)s)")
    p.add_argument(
        "--mean-events",
        type=float,
        default=SynthConfig.mean_events,
        help="mean events per user (default %(default)s)",
    )
    p.add_argument("--format", choices=FORMATS, default="csv", help="file format (default %(default)s)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = SynthConfig(users=args.users, seed=args.seed, mean_events=args.mean_events)
    frame = generate(cfg)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"error: output folder {args.out} is not empty; choose another or remove it")
    counts = write_logs(frame, args.out, args.format)
    for domain, n in counts.items():
        log.info("wrote %-8s %8d rows -> %s", domain, n, args.out / domain)
    log.info("total %d rows for %d users (seed %d)", sum(counts.values()), cfg.users, cfg.seed)


if __name__ == "__main__":
    main()
