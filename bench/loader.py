"""Benchmark: does the Ray Data path feed training fast enough, and does its memory stay flat as data grows?

    python bench/loader.py [--quick] [--users 20000] [--scale 10] [--consumers 1 2] [--shapes quickstart large]

What runs is the trainer's own data path, not a re-implementation: `autocdsr.train.init_ray` starts the
local Ray, `autocdsr.data.loader.train_dataset` (with `copies_per_pass`, exactly as `autocdsr.train.fit`)
is handed to a `TorchTrainer` with the same `DataConfig`, and every worker iterates
`autocdsr.train.RayContext.train_batches` (`streaming_split` -> `iter_torch_batches` with `SequenceCollate`,
the local shuffle buffer and `drop_last`). Each worker runs three phases (`bench_worker`):

1. consume: whole passes over its split, touching every batch (passes must be whole: a `streaming_split`
   pass starts only when every consumer asks for it). Reported: batches/s in steady state (from a pass's
   first batch on), the start-up of a pass (time to its first batch: the first pass, and later ones), and
   the worker's peak RSS (ru_maxrss) with its RSS when the loop began: the data path alone, no model yet.
2. step time: `cd` steps as `autocdsr.training.train_worker` runs them (forward, `LossBalancer.backward`,
   clipping, AdamW; no DDP all-reduce) on batches kept from phase 1, loader idle, on the worker's one
   torch thread (`cpus_per_worker=1` gives OMP_NUM_THREADS=1). The steady ratio = steady batches/s x
   seconds/step, both from the same process a minute apart: how many times faster the loader delivers
   than the step consumes.
3. loader-fed training: `--train-steps` steps fed by `train_batches`, recording how long each step
   waited for its batch (data-wait share; the first wait, a pass start-up, is reported separately).

The ratio hides one cost that only `copies_per_pass` amortises: every pass starts with a stall (its
start-up). "start-up share" = start-up / (start-up + batches per pass x step time).

Datasets: `autocdsr.synth` logs for N and scale x N users (one training row per user), built by
`jobs/build_sequences.py` through spark-submit into `bench/out/loader/users-N/` (git-ignored; reused when
present). A sampler thread in this process records the peak RSS of every other Ray worker process of this
run (read tasks, the split coordinator) and the object store in use (`ray memory --stats-only`).

The last line printed is one JSON object with the headline numbers: `min_steady_ratio`,
`max_data_wait_share`, `max_startup_share`, `rss_growth_mb` (the largest change of a worker's peak RSS
from N to scale x N users, same shape and consumers), `max_worker_peak_rss_mb`, and every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from autocdsr.config import TrainConfig, load_train_config  # noqa: E402
from autocdsr.data.loader import copies_per_pass, train_dataset  # noqa: E402
from autocdsr.data.shards import DatasetInfo, open_dataset  # noqa: E402
from autocdsr.models import build_model  # noqa: E402
from autocdsr.objectives.balancer import LossBalancer  # noqa: E402

log = logging.getLogger("bench.loader")
MB = 1024 * 1024

# name -> (config file, overrides). "large" is the paper-like shape of bench/step_time.py (128 x 200, d 32, 6 layers).
SHAPES: dict[str, tuple[str, list[str]]] = {
    "quickstart": ("conf/train/quickstart.yaml", []),
    "large": (
        "conf/train/quickstart.yaml",
        ["train.batch_size=128", "data.max_len=200", "model.n_layers=6", "model.n_heads=4"],
    ),
}


# ----------------------------------------------------------------------------- data
def build_data(root: Path, users: int, seed: int) -> Path:
    """Synth logs + sequences for ``users`` users under ``root/users-N`` (reused if already complete)."""
    base = root / f"users-{users}"
    out = base / "sequences"
    manifest = out / "manifest.json"
    if (out / "_SUCCESS").exists() and json.loads(manifest.read_text())["counts"]["users"] == users:
        log.info("dataset %s: reusing %s", users, out)
        return out
    started = time.perf_counter()
    shutil.rmtree(base, ignore_errors=True)
    py = sys.executable
    subprocess.run(
        [py, "-m", "autocdsr.synth", "--out", str(base / "logs"), "--users", str(users), "--seed", str(seed)],
        check=True,
        cwd=REPO,
    )
    bin_dir = Path(py).parent
    env = dict(os.environ, PYSPARK_PYTHON=py, PYSPARK_DRIVER_PYTHON=py)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(bin_dir / "spark-submit"), "--master", "local[2]", "--driver-memory", "4g"]
    cmd += ["--conf", "spark.ui.enabled=false"]
    cmd += ["--driver-java-options", f"-Dlog4j2.configurationFile={REPO / 'conf/spark/log4j2.properties'}"]
    cmd += [str(REPO / "jobs/build_sequences.py"), "--input", str(base / "logs"), "--output", str(out)]
    cmd += ["--config", str(REPO / "conf/data/synth.yaml"), "--force"]
    with open(base / "spark.log", "w") as spark_log:
        subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=spark_log, stderr=subprocess.STDOUT)
    log.info("dataset %s: built in %.0f s -> %s", users, time.perf_counter() - started, out)
    return out


# ----------------------------------------------------------------------------- a training step
class Stepper:
    """One `cd` training step as `autocdsr.training.train_worker` runs it (without DDP and the LR schedule)."""

    def __init__(self, cfg: TrainConfig, info: DatasetInfo) -> None:
        torch.manual_seed(cfg.seed)
        vocab = info.vocab
        self.model = build_model(
            cfg.model_config(vocab.num_items, vocab.num_domains), vocab.item_domain, vocab.item_count
        )
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.balancer = LossBalancer(cfg.balancer)
        self.shared = list(self.model.shared_parameters())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = cfg.train.grad_clip or float("inf")
        self.count = 0

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        self.count += 1
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(batch)
        info = self.balancer.backward(out.loss_rec, out.a_cd, self.shared, self.params, self.count)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if not (np.isfinite(info.loss_rec) and torch.isfinite(grad_norm)):  # the trainer's host sync
            raise RuntimeError(f"non-finite loss at step {self.count}")
        self.optimizer.step()


# ----------------------------------------------------------------------------- the Ray Train worker loop
def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bench_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: three phases on the trainer's own batches; writes rank{r}.json.

    1. consume ``passes`` whole passes (throughput, pass start-up, peak RSS of the data path alone);
    2. time ``step_repeats`` `cd` steps on batches kept from phase 1, loader idle (steps/s, side by side);
    3. ``train_steps`` steps fed by the loader, recording how long each waited for its batch.
    Every rank runs the same number of whole passes in 1 and of steps in 3: a `streaming_split` pass starts
    only when every consumer asks for it, so a rank that started one alone would wait forever.
    """
    import ray.train

    from autocdsr.train import RayContext

    cfg: TrainConfig = loop_config["config"]
    info = open_dataset(loop_config["data"])
    ctx = RayContext(cfg, info, None)
    result: dict[str, Any] = {"rank": ctx.rank, "pid": os.getpid(), "torch_threads": torch.get_num_threads()}
    result["rss_start_mb"] = _rss_mb()

    # 1. consume
    kept: list[dict[str, torch.Tensor]] = []
    batches, first, steady = 0, [], 0.0
    started = time.perf_counter()
    for epoch in range(loop_config["passes"]):
        t_pass = time.perf_counter()
        t_first = None
        for batch in ctx.train_batches(epoch):
            if t_first is None:
                t_first = time.perf_counter()
                first.append(t_first - t_pass)
            batches += 1
            _ = int(batch["target_idx"][0, -1])  # touch the data
            if len(kept) < 4:
                kept.append(batch)
        if t_first is not None:
            steady += time.perf_counter() - t_first
    total = time.perf_counter() - started
    passes = len(first)
    result.update(
        batches=batches,
        batches_per_pass=batches / max(passes, 1),
        seconds=total,
        batches_per_s=batches / total,
        steady_batches_per_s=(batches - passes) / steady if steady > 0 else float("nan"),
        first_pass_startup_s=first[0] if first else float("nan"),
        later_pass_startups_s=first[1:],
        rss_after_consume_mb=_rss_mb(),
        peak_rss_mb=_maxrss_mb(),  # the data path's peak: no model exists yet
        batch_width=statistics.mean(int(b["item_idx"].shape[1]) for b in kept),
    )

    # 2. step time, loader idle
    stepper = Stepper(cfg, info)
    times = []
    for i in range(2 + loop_config["step_repeats"]):
        t0 = time.perf_counter()
        stepper.step(kept[i % len(kept)])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    result["step_s"] = statistics.median(times)

    # 3. training fed by the loader
    waits: list[float] = []
    steps: list[float] = []
    epoch = loop_config["passes"]
    while len(steps) < loop_config["train_steps"]:
        t_prev = time.perf_counter()
        for batch in ctx.train_batches(epoch):
            t_got = time.perf_counter()
            stepper.step(batch)
            t_done = time.perf_counter()
            waits.append(t_got - t_prev)
            steps.append(t_done - t_got)
            t_prev = t_done
            if len(steps) >= loop_config["train_steps"]:
                break
        epoch += 1
    if waits:
        result["later_pass_startups_s"].append(waits[0])  # phase 3 began with a new pass
        result["later_pass_startup_s"] = statistics.mean(result["later_pass_startups_s"])
    if len(steps) > 1:
        # the first wait holds a pass start-up (counted above); the share is the steady state
        result.update(
            train_first_wait_s=waits[0],
            train_median_step_s=statistics.median(steps[1:]),
            train_median_wait_ms=1000 * statistics.median(waits[1:]),
            data_wait_share=sum(waits[1:]) / (sum(waits[1:]) + sum(steps[1:])),
        )
    result["peak_rss_with_model_mb"] = _maxrss_mb()
    Path(loop_config["results_dir"], f"rank{ctx.rank}.json").write_text(json.dumps(result))
    ray.train.report({"done": 1.0})


# ----------------------------------------------------------------------------- memory sampler (driver)
_PLASMA = re.compile(r"Plasma memory usage (\d+) MiB")


@dataclass
class Sampler:
    """Peak RSS of this process's Ray child processes (by pid) and of the object store, every ``every`` s."""

    every: float = 0.5
    peak_rss_mb: dict[int, float] = field(default_factory=dict)
    titles: dict[int, str] = field(default_factory=dict)
    peak_store_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        from ray._private.internal_api import memory_summary

        me = psutil.Process()
        n = 0
        while not self._stop.is_set():
            for p in me.children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline()[:1])
                    if not cmd.startswith("ray::"):
                        continue  # gcs, raylet, dashboard, log monitor: Ray's own services
                    rss = p.memory_info().rss / MB
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if rss > self.peak_rss_mb.get(p.pid, 0.0):
                    self.peak_rss_mb[p.pid] = rss
                    self.titles[p.pid] = cmd
            if n % 4 == 0:  # the object store summary is an RPC: every 2 s
                try:
                    m = _PLASMA.search(memory_summary(stats_only=True))
                    if m:
                        self.peak_store_mb = max(self.peak_store_mb, float(m.group(1)))
                except Exception:  # the sampler must never end the benchmark
                    pass
            n += 1
            self._stop.wait(self.every)


# ----------------------------------------------------------------------------- one TorchTrainer run
def run_trainer(
    cfg: TrainConfig, info: DatasetInfo, consumers: int, args: argparse.Namespace, name: str
) -> dict[str, Any]:
    """One TorchTrainer over the trainer's dataset (as `autocdsr.train.fit` builds it) with `bench_worker`."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rows = info.split_rows("train")
    copies = copies_per_pass(rows, cfg.train.batch_size, consumers)
    results_dir = args.work / "results" / name
    shutil.rmtree(results_dir, ignore_errors=True)
    results_dir.mkdir(parents=True)
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={
            "config": cfg,
            "data": info.root,
            "passes": args.passes,
            "step_repeats": args.step_repeats,
            "train_steps": args.train_steps,
            "results_dir": str(results_dir),
        },
        scaling_config=ScalingConfig(
            num_workers=consumers, use_gpu=False, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(args.work / "ray_results"),
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets={"train": train_dataset(info, copies, cfg.seed)},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    sampler = Sampler().start()
    t0 = time.perf_counter()
    try:
        trainer.fit()
    finally:
        sampler.stop()
    wall = time.perf_counter() - t0
    workers = [json.loads(p.read_text()) for p in sorted(results_dir.glob("rank*.json"))]
    if len(workers) != consumers:
        raise RuntimeError(f"{name}: {len(workers)} of {consumers} workers wrote results")
    worker_pids = {w["pid"] for w in workers}
    others = {pid: mb for pid, mb in sampler.peak_rss_mb.items() if pid not in worker_pids}
    return {
        "rows": rows,
        "copies": copies,
        "wall_s": wall,
        "workers": workers,
        "peak_other_ray_process_mb": max(others.values(), default=0.0),
        "peak_object_store_mb": sampler.peak_store_mb,
    }


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/loader.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="2,000 vs 20,000 users, 2 consumers, quickstart shape"
    )
    p.add_argument("--users", type=int, help="N: the smaller dataset (default 20000; --quick 2000)")
    p.add_argument(
        "--scale", type=int, default=10, help="the larger dataset has scale x N users (default 10)"
    )
    p.add_argument(
        "--consumers", type=int, nargs="+", help="Ray Train workers per run (default 1 2; --quick 2)"
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        help="configs (default quickstart large; --quick quickstart)",
    )
    p.add_argument("--passes", type=int, help="whole passes per worker in phase 1 (default 2; --quick 1)")
    p.add_argument("--step-repeats", type=int, default=10, help="timed steps, loader idle (default 10)")
    p.add_argument("--train-steps", type=int, help="loader-fed steps per worker (default 40; --quick 20)")
    p.add_argument(
        "--work", type=Path, default=REPO / "bench/out/loader", help="data and results (git-ignored)"
    )
    p.add_argument("--seed", type=int, default=7, help="synth seed")
    args = p.parse_args(argv)
    args.users = args.users or (2000 if args.quick else 20000)
    args.consumers = args.consumers or ([2] if args.quick else [1, 2])
    args.shapes = args.shapes or (["quickstart"] if args.quick else ["quickstart", "large"])
    args.passes = args.passes or (1 if args.quick else 2)
    args.train_steps = args.train_steps if args.train_steps is not None else (20 if args.quick else 40)
    args.work = args.work.resolve()
    return args


def summarise(shape: str, cfg: TrainConfig, users: int, consumers: int, r: dict[str, Any]) -> dict[str, Any]:
    """One table row: the slowest worker's rates and the largest worker's memory."""
    ws = r["workers"]

    def worst(key: str, pick=max) -> float:
        values = [w[key] for w in ws if key in w]
        return pick(values) if values else float("nan")

    startup = worst("later_pass_startup_s")
    step_s = worst("step_s")
    per_pass = worst("batches_per_pass", min)
    row = {
        "shape": shape,
        "batch": f"{cfg.train.batch_size}x{cfg.data.max_len}",
        "users": users,
        "rows": r["rows"],
        "copies": r["copies"],
        "consumers": consumers,
        "batches_per_pass": per_pass,
        "loader_batches_per_s": worst("batches_per_s", min),
        "loader_steady_batches_per_s": worst("steady_batches_per_s", min),
        "first_pass_startup_s": worst("first_pass_startup_s"),
        "later_pass_startup_s": startup,
        "step_s": step_s,
        "steps_per_s": 1 / step_s,
        # ratios per worker (rate and step time from the same process, minutes apart), the worst worker
        "steady_ratio": min(w["steady_batches_per_s"] * w["step_s"] for w in ws),
        # a pass start-up stalls training once per pass: its share of a pass of real steps
        "startup_share": startup / (startup + per_pass * step_s),
        "data_wait_share": worst("data_wait_share"),
        "train_median_wait_ms": worst("train_median_wait_ms"),
        "worker_rss_start_mb": worst("rss_start_mb"),
        "worker_peak_rss_mb": worst("peak_rss_mb"),
        "worker_peak_rss_with_model_mb": worst("peak_rss_with_model_mb"),
        "peak_other_ray_process_mb": r["peak_other_ray_process_mb"],
        "peak_object_store_mb": r["peak_object_store_mb"],
        "trainer_wall_s": r["wall_s"],
    }
    return row


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from autocdsr.train import init_ray

    load = os.getloadavg()
    log.info(
        "machine: %s, %d CPUs, %.1f GiB RAM, load average %.1f/%.1f/%.1f; torch %s, ray %s",
        platform.machine(), os.cpu_count(), psutil.virtual_memory().total / 1024**3, *load,
        torch.__version__, ray.__version__,
    )  # fmt: skip
    sizes = [args.users, args.users * args.scale]
    infos = {u: open_dataset(str(build_data(args.work, u, args.seed))) for u in sizes}
    cfgs = {s: load_train_config(REPO / SHAPES[s][0], SHAPES[s][1]) for s in args.shapes}
    # init_ray reserves the workers' CPUs + 4 logical CPUs for Ray Data (on 2 cores: 6), as `train` does
    widest = load_train_config(REPO / SHAPES[args.shapes[0]][0], [f"train.num_workers={max(args.consumers)}"])
    init_ray(widest, None)
    rows: list[dict[str, Any]] = []
    for shape in args.shapes:
        cfg = cfgs[shape]
        label = f"{shape} ({cfg.model.backbone} {cfg.train.batch_size}x{cfg.data.max_len}, d {cfg.model.d_model}, {cfg.model.n_layers} layers)"
        for users in sizes:
            for consumers in args.consumers:
                name = f"{shape}-u{users}-w{consumers}"
                log.info("%s: %d users, %d consumer(s)", label, users, consumers)
                r = run_trainer(cfg, infos[users], consumers, args, name)
                for w in r["workers"]:
                    log.info(
                        "  rank %d: %d batches in %.1f s (%.1f/s, steady %.1f/s), pass start-up %.1f s first, "
                        "%.1f s later; step %.1f ms; loader-fed steps waited %.1f%% of the time; "
                        "RSS %.0f MB at start, peak %.0f MB (%.0f MB with the model)",
                        w["rank"], w["batches"], w["seconds"], w["batches_per_s"], w["steady_batches_per_s"],
                        w["first_pass_startup_s"], w.get("later_pass_startup_s", float("nan")), 1000 * w["step_s"],
                        100 * w.get("data_wait_share", float("nan")), w["rss_start_mb"], w["peak_rss_mb"],
                        w["peak_rss_with_model_mb"],
                    )  # fmt: skip
                rows.append(summarise(shape, cfg, users, consumers, r))
    ray.shutdown()

    print_table(rows)
    growth = []
    for shape in args.shapes:
        for consumers in args.consumers:
            small, big = (
                next(
                    r for r in rows if r["shape"] == shape and r["consumers"] == consumers and r["users"] == u
                )
                for u in sizes
            )
            growth.append(big["worker_peak_rss_mb"] - small["worker_peak_rss_mb"])
    summary: dict[str, Any] = {
        "min_steady_ratio": min(r["steady_ratio"] for r in rows),
        "max_data_wait_share": max(r["data_wait_share"] for r in rows),
        "max_startup_share": max(r["startup_share"] for r in rows),
        "rss_growth_mb": max(growth, key=abs),
        "max_worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in rows),
        "sizes_users": sizes,
        "runs": rows,
    }
    print(json.dumps(_rounded(summary)))
    return 0


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| shape | users (train rows x copies) | consumers | batches/pass | loader batches/s, steady "
        "| pass start-up s (first, later) | step ms | steady ratio | start-up share | data-wait share "
        "| worker RSS MB start -> peak | other Ray proc peak MB | object store peak MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} {r['batch']} | {r['users']:,} ({r['rows']:,} x {r['copies']}) | {r['consumers']} "
            f"| {r['batches_per_pass']:.0f} | {r['loader_steady_batches_per_s']:.0f} "
            f"| {r['first_pass_startup_s']:.1f}, {r['later_pass_startup_s']:.1f} | {1000 * r['step_s']:.0f} "
            f"| {r['steady_ratio']:.1f}x | {100 * r['startup_share']:.0f}% | {100 * r['data_wait_share']:.1f}% "
            f"| {r['worker_rss_start_mb']:.0f} -> {r['worker_peak_rss_mb']:.0f} "
            f"| {r['peak_other_ray_process_mb']:.0f} | {r['peak_object_store_mb']:.0f} |"
        )
    print()


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 4) if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
