"""`basinguard batch --ray [ADDRESS]`: the batch job on a Ray cluster. Ray is imported only when this runs.

The driver (the `basinguard batch` process) locks OUT_DIR, merges earlier shards, reads and checks the prompt
file with the model's tokenizer and configs (no ONNX session on the driver), and shards the missing images
by prompt line over one actor per worker slot. Each actor holds a Pipeline, packs its own lines into full
batches, writes its PNGs into OUT_DIR and appends its entries to its own shard, `manifest.part-K.jsonl`
(one write + fsync per entry, as the local job does). At the end the driver merges the shards into
`manifest.jsonl`, each image id once (`basinguard.batch.output.merge_parts`); a killed job leaves shards that
the next run (Ray or not) merges before it decides what is missing, so resume works across shards. Each actor
holds OUT_DIR/.worker-K.lock while its process lives; Ray stops the actors of a killed driver only seconds
later, so the next run waits for those locks before it reads OUT_DIR (`output.wait_for_workers`).

Pointing it at a cluster
  basinguard batch PROMPTS OUT_DIR --ray                    a local Ray instance (or RAY_ADDRESS's cluster if set)
  basinguard batch PROMPTS OUT_DIR --ray auto               the cluster this node belongs to (`ray start` ran here)
  basinguard batch PROMPTS OUT_DIR --ray ray://head:10001   Ray Client: the driver runs off-cluster
(--ray takes an optional value, so put it after the positional arguments or give it an address.)
Every node needs the same Python environment with basinguard installed (or pass it in a runtime_env), the
model folder at the same path, and OUT_DIR on a filesystem all nodes share (e.g. NFS) at the same path:
workers write their images there. The lock on OUT_DIR guards against a second driver on the same node.
`--ray-workers K` sets the actor count (default: the cluster's CPUs // CPUs per worker, or its GPUs for
--provider cuda/tensorrt); each actor reserves `--threads` CPUs (default 1) and, on GPU, one GPU.
If an actor dies the job stops with Ray's error; run it again with the same arguments to finish it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from basinguard.batch.job import BatchJob, BatchSummary, finish, open_job, progress_bar
from basinguard.batch.output import (
    MANIFEST,
    ImageSink,
    ManifestWriter,
    OutputSettings,
    hold_worker_lock,
    slim,
    write_batch,
)
from basinguard.batch.prompts import ImageTask, pack
from basinguard.errors import BasinguardError, first_line
from basinguard.runtime.spec import ModelSpec

LOCAL = "local"  # `--ray` without an address
# The labels a provider's images carry (the driver loads no model to ask): tensorrt is native or ONNX Runtime's EP.
ENGINE_LABELS = {"cpu": {"cpu"}, "cuda": {"cuda"}, "tensorrt": {"tensorrt", "ort-tensorrt"}}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BasinguardError("--ray needs Ray: pip install 'basinguard[ray]'") from None
    return ray


class BatchWorker:
    """One worker slot: a Pipeline and its manifest shard. Wrapped with `ray.remote` at run time."""

    def __init__(self, model: str, provider: str, threads: int | None, out_dir: str, shard: int, identity: dict,
                 static_shapes: bool = False, output: OutputSettings | None = None):
        from basinguard.runtime.pipeline import Pipeline

        self.out_dir, self.identity, self.shard = Path(out_dir), identity, shard
        self.manifest: ManifestWriter | None = None
        self.sink: ImageSink | None = None
        # An error here would reach the driver as "the actor died", without its message: it is kept and raised by
        # the first `run`, which Ray reports with the error itself.
        self._failure: Exception | None = None
        try:
            self._lock = hold_worker_lock(self.out_dir, shard)  # first, and until this process ends: wait_for_workers
            self.pipeline = Pipeline(Path(model), provider=provider, threads=threads, static_shapes=static_shapes)
            self.manifest = ManifestWriter(self.out_dir / MANIFEST.replace(".jsonl", f".part-{shard}.jsonl"))
            # shards named for this worker (shard-KKK-NNNNNN), so workers never write the same name
            self.sink = ImageSink(self.out_dir, self.manifest, output or OutputSettings(), writer=shard)
        except Exception as exc:
            self._failure = exc

    def run(self, batch: list[ImageTask]) -> list[dict]:
        if self._failure is not None:
            raise self._failure
        assert self.sink is not None
        return write_batch(self.pipeline, batch, self.identity, self.sink, {"shard": self.shard})

    def close(self) -> list[dict]:
        """Publish the last, partial shard; returns its entries."""
        entries = [] if self.sink is None else self.sink.close()
        if self.manifest is not None:
            self.manifest.close()
        return entries


def shard_by_line(tasks: Sequence[ImageTask], workers: int) -> list[list[ImageTask]]:
    """Whole prompt lines per worker, each line to the worker with the fewest images so far (file order)."""
    lines: dict[int, list[ImageTask]] = {}
    for task in tasks:
        lines.setdefault(task.line, []).append(task)
    shards: list[list[ImageTask]] = [[] for _ in range(workers)]
    for line_tasks in lines.values():
        min(shards, key=len).extend(line_tasks)
    return shards


def worker_slots(nodes: Sequence[dict], cpus: int, provider: str) -> int:
    """How many workers (`cpus` CPUs each, and one GPU each off the CPU provider) the cluster's live nodes hold at
    once (`ray.nodes()`). Ray places an actor on one node, so this counts per node, not over the cluster's total."""
    slots = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        resources = node.get("Resources", {})
        fit = int(resources.get("CPU", 0) // cpus)
        slots += min(fit, int(resources.get("GPU", 0))) if provider != "cpu" else fit
    return slots


def check_resources(workers: int, slots: int, cpus: int, provider: str) -> None:
    """Ray keeps an actor no node can hold pending for ever, and the job would wait without a word: refuse more
    workers than the nodes hold."""
    if workers > slots:
        each = f"{cpus} CPU(s){' and one GPU' if provider != 'cpu' else ''} each (--threads {cpus})"
        raise BasinguardError(f"{workers} Ray worker(s) of {each}: the cluster's nodes hold {slots} such workers now; "
                              "lower --ray-workers or --threads, or add nodes")


def run_batch_ray(job: BatchJob, model: Path, provider: str = "cpu", threads: int | None = None,
                  address: str | None = LOCAL, workers: int | None = None, static_shapes: bool = False) -> BatchSummary:
    """Run (or resume) `job` on Ray. An already initialised Ray (e.g. a test's `ray.init(...)`) is used as is."""
    ray = _import_ray()
    if workers is not None and workers < 1:
        raise BasinguardError(f"--ray-workers must be >= 1 (got {workers})")
    spec = ModelSpec(model)
    with open_job(job, spec, lambda: ENGINE_LABELS[provider]) as opened:
        pending, identity = opened.pending, opened.identity
        if not pending:
            return finish(opened, [], 0.0)
        if not ray.is_initialized():
            try:
                ray.init(address=None if address == LOCAL else address, include_dashboard=False,
                         log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:  # no cluster there; ray:// without ray[client]
                where = "a local Ray instance" if address == LOCAL else f"Ray at {address}"
                raise BasinguardError(f"cannot start or join {where}: {first_line(exc)}") from None
        cpus = threads or 1
        slots = worker_slots(ray.nodes(), cpus, provider)
        shards = [s for s in shard_by_line(pending, workers or max(1, slots)) if s]
        check_resources(len(shards), slots, cpus, provider)
        actor_class = ray.remote(BatchWorker).options(num_cpus=cpus, num_gpus=0 if provider == "cpu" else 1)
        actors = [actor_class.remote(str(Path(model).resolve()), provider, cpus, str(job.out_dir.resolve()), k,
                                     identity, static_shapes, job.output) for k in range(len(shards))]
        new: list[dict] = []
        start = time.perf_counter()
        try:
            # Submit every batch up front: an actor runs its calls one at a time, in order.
            running = {actor.run.remote(batch): len(batch)
                       for actor, shard in zip(actors, shards, strict=True) for batch in pack(shard, job.batch_size)}
            with progress_bar(len(pending), job.progress) as bar:
                while running:
                    ready, _ = ray.wait(list(running), num_returns=1)
                    new += map(slim, ray.get(ready[0]))
                    bar.update(running.pop(ready[0]))
            for entries in ray.get([actor.close.remote() for actor in actors]):
                new += map(slim, entries)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, BasinguardError | OSError):
                raise exc.cause from None  # reported as the same failure of a local job would be
            raise  # a bug: keep the worker's traceback
        except ray.exceptions.RayActorError as exc:
            raise BasinguardError(f"a Ray worker died: {first_line(exc)}") from None
        finally:
            for actor in actors:
                ray.kill(actor)  # a stopped job must not keep writing into OUT_DIR
        return finish(opened, new, time.perf_counter() - start)
