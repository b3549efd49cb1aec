"""Scale-out on Ray: batches across a pool of workers, and one huge image across a cluster.

Nothing here imports Ray at module level: the local paths (``import
ultrastyle``, ``ultrastyle stylize`` without ``--ray``) never load it. The
pieces:

- `cluster`: start a local Ray instance bound to 127.0.0.1, or join one.
- `worker`: the actor, one runner per actor (`StylizeWorker`).
- `pool`: `WorkerPool`, the driver side: a batch as content jobs on the
  actors (`WorkerPool.run_batch`), and one image's stages as tile jobs
  (`WorkerPool.stylize_image`), with style statistics computed once and
  broadcast through the object store.
- `zarr_canvas`: a `Canvas` over a zarr array on a folder every worker sees
  (one chunk per tile core, so writers never share a chunk).

See docs/ray.md.
"""

from __future__ import annotations

__all__ = ["ClusterError", "WorkerPool"]


def __getattr__(name: str) -> object:
    if name == "WorkerPool":
        from ultrastyle.distributed.pool import WorkerPool

        return WorkerPool
    if name == "ClusterError":
        from ultrastyle.distributed.cluster import ClusterError

        return ClusterError
    raise AttributeError(f"module 'ultrastyle.distributed' has no attribute {name!r}")
