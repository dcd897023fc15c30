"""Scale-out on dask.distributed: one task per unfinished shard, the model loaded once per worker.

Workers need the dataset's audio and the output folder at the same paths as the client (a shared
filesystem). The client never loads the model: one worker reports the model's fingerprint and
dims, every task checks that its worker's weights have that fingerprint, and the client builds the
index once every shard is finished. GPU workers are started with `resources={"GPU": 1}`
(`dask worker ... --resources GPU=1`); CUDA tasks then ask for one GPU each.
"""
from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from pathlib import Path

import dask
from distributed import Client, LocalCluster, as_completed
from wat.data.clikit.progress import progress

from wat.data.datasets import Dataset

from .pipeline import ExtractError, ExtractOptions, ShardResult, cache_meta, extract_shard, get_model

RETRIES = 2


@contextmanager
def connect(scheduler: str | None = None, local_workers: int | None = None, device: str = "cpu"):
    """A Client on an existing scheduler, or on a LocalCluster of `local_workers` processes."""
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, ValueError) as e:  # TimeoutError is an OSError; a malformed address a ValueError
            raise ExtractError(f"cannot reach dask scheduler {scheduler}: {e}") from None
        with client:
            yield client
        return
    with _local_cluster(local_workers, device) as cluster, Client(cluster) as client:
        yield client


def _local_cluster(n: int, device: str):
    # dask starts workers with OMP_NUM_THREADS=1, so on CPU choose N ~ the number of cores.
    # Non-daemonic workers may start DataLoader decode processes of their own.
    with dask.config.set({"distributed.worker.daemon": False}):
        if device.startswith("cuda"):
            import torch

            if torch.cuda.device_count() > 1:
                try:
                    from dask_cuda import LocalCUDACluster  # one worker per GPU, CUDA_VISIBLE_DEVICES set
                except ImportError:
                    pass
                else:
                    return LocalCUDACluster(n_workers=min(n, torch.cuda.device_count()), threads_per_worker=1,
                                            resources={"GPU": 1})
            return LocalCluster(n_workers=n, threads_per_worker=1, processes=True, resources={"GPU": 1})
        return LocalCluster(n_workers=n, threads_per_worker=1, processes=True)


def _resources(client: Client, device: str) -> dict | None:
    if not device.startswith("cuda"):
        return None
    workers = client.scheduler_info().get("workers", {}).values()
    if any(w.get("resources", {}).get("GPU") for w in workers):
        return {"GPU": 1}
    return None  # no worker declares GPUs: asking for one would leave every task waiting forever


def _meta_task(dataset: Dataset, options: ExtractOptions, clip_seconds: float):
    encoder = get_model(options.model, options.device)
    return cache_meta(encoder, dataset, options, clip_seconds)


def _shard_task(clips, options: ExtractOptions, path: str, meta) -> ShardResult:
    encoder = get_model(options.model, options.device)
    if encoder.fingerprint != meta.fingerprint:
        raise ExtractError(f"worker loaded {options.model!r} with fingerprint {encoder.fingerprint}, "
                           f"the run uses {meta.fingerprint}: workers must see the same weights")
    return extract_shard(encoder, clips, options, path, meta)


class DaskRunner:
    """The `pipeline.ShardRunner` of a dask.distributed Client: `extract_dataset(..., runner=DaskRunner(client))`."""

    def __init__(self, client: Client):
        self.client = client

    def cache_meta(self, dataset: Dataset, options: ExtractOptions, clip_seconds: float):
        return model_meta(self.client, dataset, options, clip_seconds)

    def run_shards(self, todo, options: ExtractOptions, shard_dir: Path, meta) -> list[ShardResult]:
        return run_shards(self.client, todo, options, shard_dir, meta)


def model_meta(client: Client, dataset: Dataset, options: ExtractOptions, clip_seconds: float):
    """The cache meta, computed on a worker (which keeps the model loaded for its shards)."""
    light = dataclasses.replace(dataset, clips=[], problems=[])  # the clip list is not needed there
    fut = client.submit(_meta_task, light, options, clip_seconds, pure=False,
                        resources=_resources(client, options.device))
    try:
        return fut.result()
    except ExtractError:  # the worker's encoder cannot give these features: its message says why
        raise
    except Exception as e:
        raise ExtractError(f"loading {options.model!r} on a dask worker failed: {e}") from None


def run_shards(client: Client, todo, options: ExtractOptions, shard_dir: Path, meta) -> list[ShardResult]:
    """Submit one task per shard, wait for all, raise if any failed for good (after retries)."""
    from wat.data.cache import shard_path

    resources = _resources(client, options.device)
    opts = dataclasses.replace(options, progress=False)
    futures = {}
    for i, clips in todo:
        path = str(shard_path(Path(shard_dir).resolve(), i))
        clips = [dataclasses.replace(c, path=os.path.abspath(c.path)) for c in clips]  # workers' cwd differs
        fut = client.submit(_shard_task, clips, opts, path, meta, key=f"wat-shard-{i:05d}-{meta.fingerprint[:8]}",
                            retries=RETRIES, resources=resources, pure=False)
        futures[fut] = (i, len(clips))
    results, failed = [], []
    with progress(total=sum(n for _, n in futures.values()), unit="clip", desc="extract",
              disable=None if options.progress is None else not options.progress) as bar:
        for fut in as_completed(futures):
            i, n = futures[fut]
            if fut.status == "finished":
                results.append(fut.result())
            else:
                failed.append((i, fut.exception()))
            bar.update(n)
    if failed:
        first = failed[0]
        raise ExtractError(f"{len(failed)} shard(s) failed after {RETRIES} retries "
                           f"({', '.join(str(i) for i, _ in failed[:10])}); shard {first[0]}: {first[1]}; "
                           f"rerun the same command to resume")
    return results
