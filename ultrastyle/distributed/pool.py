"""`WorkerPool`: the driver side of Ray runs, a pool of `StylizeWorker` actors.

Why a plain actor pool and not a Ray Data ``map_batches`` pipeline: the same
actors (one runner each, opened once) serve both a batch (a content's pairs
per call) and one image's tiles (a share of a stage per call, between which
the driver reduces statistics and fits the maps), which Ray Data's one-pass
dataflow does not express; and on a small machine (2 cores here) Ray Data's
streaming executor, its extra imports (pyarrow, pandas: 1.5 s against 0.4 s
for ``import ray``) and block conversions of rows that are only paths cost
CPU the stylization needs. The scheduling is a few lines: jobs go to idle
actors, results come back with ``ray.wait``, and a job whose actor died (a
killed process, a lost node) is retried on another actor while a replacement
actor starts wherever the cluster has room.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrastyle import options as check
from ultrastyle.core.plan import StagePlan, plan_image
from ultrastyle.core.styles import Target
from ultrastyle.distributed.cluster import ClusterError, connect, disconnect, import_ray, is_loopback
from ultrastyle.distributed.worker import (
    FORWARDED_ENV, DiskFull, RunnerSpec, StyleTable, StylizeWorker, WorkerInfo, as_float32_band, file_signature, stats_sum,
)  # fmt: skip
from ultrastyle.distributed.zarr_canvas import ZarrCanvas, create_array, require_zarr
from ultrastyle.io import atomic
from ultrastyle.io.images import ImageError
from ultrastyle.io.pyramid import output_meta, save_output
from ultrastyle.io.sources import image_header
from ultrastyle.errors import Setting, remedied
from ultrastyle.runtime.backends.base import RunnerError
from ultrastyle.runtime.batch import InOrder, StylizeOptions, _failure, content_runs
from ultrastyle.runtime.decode import load_content
from ultrastyle.runtime.pairs import BatchInterrupted, BatchSummary, Pair, PairResult, StyleSpec, not_made_disk_full
from ultrastyle.runtime.memory import available_bytes
from ultrastyle.runtime.tiled import TileCallback


def _stage_folder(scratch: str | os.PathLike) -> Path:
    """This machine's folder for stage arrays in a shared ``scratch``: temp names hold a pid, which only the machine that
    wrote them may judge dead (another driver's sweep of the shared folder would remove live arrays)."""
    return Path(scratch) / f".ultrastyle-stages-{socket.gethostname()}"


MAX_ATTEMPTS = 3  # a job is tried on this many actors before its pairs fail
KILL_WAIT_S = 10.0  # at most this long for killed actors to be gone, so the last sweep may drop their temp files
TILE_JOBS_PER_WORKER = 4  # a stage's tiles are cut into this many jobs per worker (balance, and little to redo on a loss)


class TileJobError(RuntimeError):
    """A share of a stage's tiles failed on every attempt; the image cannot be finished."""


@dataclass
class _Job:
    """One unit of work for an actor; ``payload`` is what its call needs, ``tries`` the actors lost running it."""

    payload: Any
    tries: int = 0


class WorkerPool:
    """A pool of Ray actors, one runner each, for batches (`run_batch`) and for one image across the cluster (`stylize_image`).

    ``address``: ``"local"`` starts Ray on this machine alone, bound to
    127.0.0.1; ``host:port`` (or ``ray://``, ``"auto"``) joins an existing
    cluster, whose workers must all see the input, output and ``scratch``
    folders at the same paths. ``workers``: actors (default: the cluster's
    CPUs over ``cpus_per_worker``, or its GPUs with ``device="cuda"``, one
    each); each runs its network on ``threads`` (default ``cpus_per_worker``)
    threads. The model is opened by every actor (``model``: a zoo name
    installed on every node, or a folder every node sees). Raises
    `ClusterError` when Ray is missing or unreachable, `RunnerError` when the
    workers cannot open the model. Use as a context manager, or `close`.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        address: str = "local",
        workers: int | None = None,
        cpus_per_worker: float = 1.0,
        backend: str = "auto",
        device: str = "cpu",
        precision: str = "fp32",
        threads: int = 0,
        compile: bool = False,
        stages: Sequence[int] | None = None,
        start_timeout: float = 600.0,
    ) -> None:
        if workers is not None:  # before Ray starts
            check.count("workers", workers, least=1)
        check.number("cpus_per_worker", cpus_per_worker, above=0)
        self._owns_ray = False
        try:
            self._owns_ray = connect(address)
        except ClusterError:  # Ray missing, or refused: nothing was started
            raise
        except BaseException:  # a Ctrl-C inside ray.init: what it started of a local instance is stopped
            if address == "local":
                disconnect()
            raise
        self._ray = import_ray(is_loopback(address))
        ray = self._ray
        try:
            gpus = 1 if device == "cuda" else 0
            have = ray.cluster_resources()
            # A local instance without a GPU would have its actors wait for one until the start time-out. (A cluster's
            # autoscaler may add GPU nodes for them: there the wait is the start time-out's.)
            if gpus and address == "local" and have.get("GPU", 0) < 1:
                raise remedied(ClusterError("device='cuda', but this machine has no GPU that Ray sees, so no worker could "
                                            "start; use device='cpu', or join a cluster with GPU nodes"), Setting("device", "cpu"))  # fmt: skip
            if workers is None:
                workers = max(1, int(have.get("GPU", 0)) if gpus else int(have.get("CPU", 1) // cpus_per_worker))
            fits = int(have.get("CPU", 1) // cpus_per_worker)
            if address == "local" and not gpus and workers > max(1, fits):  # the rest waited 30 s for CPUs that never come
                raise remedied(ClusterError(f"{workers} workers of {cpus_per_worker:g} CPU each are more than this machine's "
                                            f"{have.get('CPU', 1):g} CPUs hold; give at most {max(1, fits)} workers"),
                               Setting("workers", max(1, fits)))  # fmt: skip
            self.spec = RunnerSpec(
                str(model), backend, device, precision, threads or max(1, int(cpus_per_worker)),
                tuple(sorted(set(stages))) if stages else None, compile,
            )  # fmt: skip
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            self._make = lambda: ray.remote(StylizeWorker).options(
                num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=0, max_concurrency=1, scheduling_strategy="SPREAD"
            ).remote(self.spec, env)  # fmt: skip
            self.start_timeout = start_timeout
            self._actors: list[Any] = []
            self._warming: dict[Any, Any] = {}  # info ref -> actor not yet up (it joins when it is)
            self._spares = 2 * workers  # replacements allowed over the pool's life
            self._info: dict[Any, WorkerInfo] = {}
            self._killed: set[tuple[str, int]] = set()  # (host tag, pid) of the workers this pool killed mid-call
            self._start(workers)
        except BaseException:
            self.close()
            raise
        first = self.workers[0]
        assert first.arch is not None and first.traits is not None
        self.arch, self.traits, self.stages, self.backend = first.arch, first.traits, first.stages, first.backend

    @property
    def device(self) -> torch.device:
        """Where the workers' runners keep their tensors (as a runner's ``device``)."""
        return torch.device(self.spec.device)

    @property
    def workers(self) -> list[WorkerInfo]:
        """The live actors' process ids, nodes and runners (replacements included)."""
        return [self._info[a] for a in self._actors]

    def _start(self, count: int) -> None:
        """Start ``count`` actors; return once one is up (those still starting join when they are: a busy cluster)."""
        ray = self._ray
        refs = {}
        for _ in range(count):
            actor = self._make()
            refs[actor.info.remote()] = actor
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=min(30.0, self.start_timeout))
        if not ready:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=self.start_timeout)
        if not ready:
            raise ClusterError(
                f"no Ray worker started within {self.start_timeout:.0f} s; the cluster may lack the "
                "CPUs/GPUs asked for (fewer workers, or fewer cpus per worker)"
            )
        for ref in ready:
            actor = refs.pop(ref)
            try:
                info: WorkerInfo = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a worker process that could not even start
                raise ClusterError(f"a Ray worker failed to start: {exc}") from None
            if info.error:
                raise remedied(RunnerError(f"the Ray workers cannot open the model {self.spec.model}: {info.error}"), info.remedy)
            self._info[actor] = info
            self._actors.append(actor)
        self._warming.update(refs)

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the actors; a Ray instance this pool started is shut down (idempotent)."""
        ray = getattr(self, "_ray", None)
        if ray is not None and ray.is_initialized():
            for a in [*getattr(self, "_actors", []), *getattr(self, "_warming", {}).values()]:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self._actors, self._warming = [], {}
        if getattr(self, "_owns_ray", False):
            self._owns_ray = False
            disconnect()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- scheduling --------------------------------------------------------------------------------------------

    def _replace(self, actor: Any) -> None:
        """Drop a dead actor; start a replacement (it joins once up, wherever the cluster has room)."""
        if actor in self._actors:
            self._actors.remove(actor)
        if self._spares > 0:
            self._spares -= 1
            new = self._make()
            self._warming[new.info.remote()] = new

    def _run(
        self,
        jobs: Sequence[_Job],
        submit: Callable[[Any, _Job], Any],
        on_done: Callable[[_Job, Any], None],
        on_failed: Callable[[_Job, str], None],
        skip: Callable[[_Job], bool] | None = None,
    ) -> None:
        """Run ``jobs`` on the actors: ``submit(actor, job)`` returns the call's ref; results to ``on_done``.

        A job whose actor died is retried elsewhere (`MAX_ATTEMPTS` actors in
        all); an error raised by the call itself, or no actor left, goes to
        ``on_failed`` with a message. ``skip(job)`` true: a job not yet
        submitted is not (it made its own results: the batch has stopped).
        Calls left running at an exception (Ctrl-C) are abandoned with their actors.
        """
        ray = self._ray
        from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError

        lost_errors = (RayActorError, WorkerCrashedError, ObjectLostError)
        pending = deque(jobs)
        idle = list(self._actors)
        busy: dict[Any, tuple[_Job, Any]] = {}
        waited_since: float | None = None
        try:
            while pending or busy:
                while pending and idle:
                    job = pending.popleft()
                    if skip is not None and skip(job):
                        continue
                    actor = idle.pop()
                    busy[submit(actor, job)] = (job, actor)
                while pending and skip is not None and skip(pending[0]):  # stopped: no need to wait for an actor
                    pending.popleft()
                if not busy and not self._warming:
                    for job in pending:
                        on_failed(job, "no Ray worker is left to run it (every worker was lost)")
                    return
                if not busy:  # every actor lost: wait for a replacement, within the start time-out
                    waited_since = waited_since or time.monotonic()
                    if time.monotonic() - waited_since > self.start_timeout:
                        for job in pending:
                            on_failed(job, f"no Ray worker came back within {self.start_timeout:.0f} s")
                        return
                refs = list(busy) + list(self._warming)
                ready, _ = ray.wait(refs, num_returns=1, timeout=5.0)
                for ref in ready:
                    if ref in self._warming:  # a replacement came up (or failed to)
                        actor = self._warming.pop(ref)
                        try:
                            info = ray.get(ref)
                        except Exception:  # noqa: BLE001 - it died starting: no room, or its node went
                            continue
                        if info.error is None:
                            self._info[actor] = info
                            self._actors.append(actor)
                            idle.append(actor)
                            waited_since = None
                        continue
                    job, actor = busy.pop(ref)
                    try:
                        value = ray.get(ref)
                    except lost_errors:
                        job.tries += 1
                        self._replace(actor)
                        if job.tries >= MAX_ATTEMPTS:
                            on_failed(job, f"{job.tries} Ray workers were lost running it")
                        else:
                            pending.appendleft(job)
                        continue
                    except RayTaskError as exc:  # the call raised: a bug or an unexpected error, not the worker's loss
                        idle.append(actor)
                        on_failed(job, f"{type(exc.cause).__name__}: {exc.cause}" if exc.cause else str(exc))
                        continue
                    except GetTimeoutError:  # pragma: no cover - ready refs do not time out
                        pending.appendleft(job)
                        continue
                    idle.append(actor)
                    on_done(job, value)
        except BaseException:
            for _, actor in busy.values():  # their calls may be mid-write: stop them (temp files are swept)
                if actor in self._info:  # another machine's pid means nothing here: the sweep is told it is dead
                    self._killed.add((self._info[actor].host_tag, self._info[actor].pid))
                try:
                    ray.kill(actor)
                except Exception:  # noqa: BLE001
                    pass
                self._replace(actor)
            # ray.kill returns at once; the sweep after this keeps the temp files of live writers (of this machine).
            pids = [self._info[a].pid for _, a in busy.values() if a in self._info and self._info[a].host == socket.gethostname()]
            deadline = time.monotonic() + KILL_WAIT_S
            try:
                while (pids := [p for p in pids if atomic.is_alive(p)]) and time.monotonic() < deadline:
                    time.sleep(0.05)
            except BaseException:  # noqa: BLE001 - a second Ctrl-C: the next run sweeps what is left
                pass
            raise

    # --- batches -----------------------------------------------------------------------------------------------

    def style_table(self, pairs: Sequence[Pair], options: StylizeOptions) -> Any:
        """The statistics of every style of ``pairs``, computed once (spread over the actors), put in the object store."""
        sources = list(dict.fromkeys(src for p in pairs for src in p.style.paths))
        table: dict[Any, Any] = {}
        if options.preserve_color != "match":  # matched styles are recoloured per content, on the workers
            jobs = [_Job(src) for src in sources]

            def failed(job: _Job, why: str) -> None:
                table[job.payload] = ImageError(f"style {job.payload}: {why}")

            self._run(jobs, lambda a, j: a.style_statistics.remote(j.payload, options),
                      lambda j, v: table.__setitem__(j.payload, v), failed)  # fmt: skip
        return self._ray.put(table)

    def run_batch(
        self,
        pairs: list[Pair],
        options: StylizeOptions,
        on_result: Callable[[PairResult], None] | None = None,
        on_tile: TileCallback | None = None,
        *,
        distribute_tiles: bool = False,
        scratch: str | os.PathLike | None = None,
    ) -> BatchSummary:
        """`runtime.batch.run_batch` on the cluster: the same outputs, names, results (in pair order) and summary.

        Each content's pairs run on one actor (``distribute_tiles``: each
        image runs on every actor, one after the other, `stylize_image`;
        ``scratch``: the shared folder for its stage arrays, default a hidden
        folder beside each output). ``on_tile`` reports tiles only with
        ``distribute_tiles``. A write that finds its disk full stops the batch as
        the local one stops: the contents not yet begun are not computed (those
        running on other actors finish). Ctrl-C raises `BatchInterrupted` with the pairs
        finished; outputs being written are abandoned and their temp files swept.
        """
        if distribute_tiles:
            require_zarr()
        t_start = time.perf_counter()
        stages_in = _stage_folder(scratch) if distribute_tiles and scratch else None
        folders = {p.output.parent for p in pairs if p.output is not None} | ({stages_in} if stages_in else set())
        for folder in folders:
            atomic.sweep_stale(folder)  # temp files of a killed earlier run (its workers are gone)
        results, runs = content_runs(pairs, options.skip_existing)
        summary = BatchSummary(planned=len(pairs))
        report = InOrder(results, summary, on_result)
        jobs = [_Job(run) for run in runs]
        signatures = [file_signature(p.output) for p in pairs]  # what each output was before: written since, it is this run's
        full: list[DiskFull] = []  # the first output whose write found its disk full: the jobs not yet begun are not run

        def written_since(i: int) -> None:
            """Pair ``i`` done if unreported and its output was renamed into place since the start (by a call cut off)."""
            pair = pairs[i]
            if results[i] is None and pair.output is not None and file_signature(pair.output) not in (None, signatures[i]):
                header = image_header(pair.output)
                results[i] = PairResult(pair, "done", None, 0.0, header[0] * header[1] / 1e6 if header else 0.0)

        def stopped(job: _Job) -> bool:
            if not full:
                return False
            for i in job.payload[1]:
                if job.tries:  # what its lost attempt wrote whole is done
                    written_since(i)
                results[i] = results[i] or not_made_disk_full(pairs[i], *full[0])
            report()
            return True

        report()
        try:
            styles = self.style_table([pairs[i] for job in jobs for i in job.payload[1]], options) if jobs else None
            if distribute_tiles:
                for job in jobs:
                    if not stopped(job):
                        self._tiled_job(job, pairs, options, styles, results, on_tile, scratch, full)
                        report()
            else:

                def submit(actor: Any, job: _Job) -> Any:
                    content, idx = job.payload
                    written = [signatures[i] for i in idx] if job.tries else None
                    return actor.stylize_pairs.remote(content, [pairs[i] for i in idx], options, styles, written)

                def done(job: _Job, value: tuple[list[PairResult], DiskFull | None]) -> None:
                    got, disk = value
                    if disk is not None and not full:
                        full.append(disk)
                    for i, r in zip(job.payload[1], got):
                        results[i] = PairResult(pairs[i], r.status, r.error, r.seconds, r.megapixels, remedy=r.remedy, option=r.option)
                    report()

                def failed(job: _Job, why: str) -> None:
                    for i in job.payload[1]:
                        results[i] = PairResult(pairs[i], "failed", f"{pairs[i].content}: stylization failed ({why})")
                    report()

                self._run(jobs, submit, done, failed, skip=stopped)
            report()
        except KeyboardInterrupt:
            for i in range(len(pairs)):  # whole outputs (renamed into place) of the jobs cut off: finished, if unreported
                written_since(i)
            summary.results += [r for r in results[report.reported:] if r is not None]
            summary.wall_seconds = time.perf_counter() - t_start
            raise BatchInterrupted(summary, abandoned=True) from None
        finally:
            # Again at the end: after Ctrl-C the abandoned writers are dead; and a killed driver's actors outlive
            # it until Ray stops them (asynchronously), so one still writing at the start may have died since.
            for folder in folders:
                atomic.sweep_stale(folder, dead=self._killed)
            if stages_in is not None:
                with contextlib.suppress(OSError):  # empty unless another run of this machine is using it
                    stages_in.rmdir()
        summary.wall_seconds = time.perf_counter() - t_start
        return summary

    def _tiled_job(self, job: _Job, pairs: list[Pair], options: StylizeOptions, styles: Any,
                   results: list[PairResult | None], on_tile: TileCallback | None, scratch: str | os.PathLike | None,
                   full: list[DiskFull]) -> None:  # fmt: skip
        """One content's pairs, each image spread over every actor; written by the driver. A write that finds its disk
        full goes into ``full``, and the pairs after it are not computed."""
        content, idx = job.payload
        try:
            pixels, _ = load_content(content, options)
        except Exception as exc:  # noqa: BLE001 - the content's pairs fail, the batch goes on
            for i in idx:
                results[i] = _failure(pairs[i], exc)
            return
        table: StyleTable = self._ray.get(styles)
        for i in idx:
            pair = pairs[i]
            assert pair.output is not None
            if full:
                results[i] = not_made_disk_full(pair, *full[0])
                continue
            t0 = time.perf_counter()
            try:
                # Matched styles are recoloured per content (`style_table` leaves them out): `stylize_image` computes them.
                stats = None if options.preserve_color == "match" else [table[s] for s in pair.style.paths]
                bad = [s for s in stats or () if isinstance(s, ImageError)]
                if bad:
                    raise bad[0]
                # The stage arrays: a temp name of this process (swept by a later run if this driver is killed).
                base = _stage_folder(scratch) if scratch is not None else pair.output.parent
                try:  # the output folder is made as the local batch makes it, before the stage arrays go in it
                    base.mkdir(parents=True, exist_ok=True)
                    work = atomic.partial_path(base / f"{pair.output.name}.tiles")
                    os.mkdir(work)
                except OSError as exc:
                    where = "scratch" if scratch is not None else "output"
                    raise ImageError(f"{base}: cannot write to the {where} directory ({exc.strerror or exc})") from exc
                try:
                    result = self.stylize_image(pixels, pair.style, options, work, stats=stats, on_tile=on_tile)
                    save_output(result, pair.output, options.format, depth=options.depth, png_level=options.png_level,
                                pyramid=options.pyramid, meta=output_meta(pair.content, result, options.metadata))  # fmt: skip
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            except (ImageError, ValueError, TileJobError, OSError) as exc:
                results[i] = _failure(pair, exc, time.perf_counter() - t0)
                if not full and (cause := atomic.disk_full(exc)) is not None:
                    full.append((pair.output, cause))
                continue
            h, w = pixels.shape[:2]
            results[i] = PairResult(pair, "done", None, time.perf_counter() - t0, h * w / 1e6)

    # --- one image across the cluster ----------------------------------------------------------------------------

    def stylize_image(
        self,
        pixels: np.ndarray,
        style: StyleSpec,
        options: StylizeOptions,
        work: str | os.PathLike,
        *,
        stats: Sequence[Any] | None = None,
        on_tile: TileCallback | None = None,
    ) -> ZarrCanvas:
        """One (H, W, 3) image through the cascade of ``options``, every stage's tiles spread over the actors.

        Per stage: pass 1 runs as jobs returning one float64 `FeatureStats`
        per tile, summed here in tile order (as one machine sums them), the
        affine map is fitted here, and pass 2 runs as jobs writing each tile's
        core into a zarr array in ``work`` (a folder every worker sees) whose
        chunks are the cores. The tiles are the ones one machine would plan
        (`core.plan.plan_image` with the workers' traits), so the result is
        that of `runtime.tiled.stylize_tiled`. Returns the last stage's (3, H, W)
        canvas in ``work``. ``stats``: the style's per-stage statistics (one
        per style of a mix), else computed by a worker. Mask regions are not
        supported here (ValueError).
        """
        if style.mask is not None:
            raise ValueError("mask regions are not supported across the cluster; run masked pairs one image per worker")
        require_zarr()
        work = Path(work)
        h, w = pixels.shape[:2]
        plan = plan_image(self.arch, h, w, options.levels, options.tiling_for(self.traits), self.traits,
                          self.device, ram_available=available_bytes())  # fmt: skip
        content = create_array(work / "content", (3, h, w), (min(h, 1024), min(w, 1024)))
        for r in range(0, h, 512):  # as `canvas_from_array` scales them
            content.write(r, 0, as_float32_band(pixels, r, min(h, r + 512)))
        recolor = None
        if options.preserve_color == "match":
            from ultrastyle.core.color import rgb_statistics

            recolor, stats = rgb_statistics(content), None
        if stats is None:
            stats = self._style_stats(style, options, recolor)
        target = Target(tuple(stats), style.weights or (1.0,))
        x = content
        for n, k in enumerate(options.levels):
            y = self._stage(plan.stage(k), x, work / f"stage{n}_{k}", target, options, plan.keep_bytes, on_tile)
            if x is not content:
                shutil.rmtree(x.path, ignore_errors=True)
            x = y
        if options.preserve_color == "luminance":
            from ultrastyle.core.color import keep_content_chroma_canvas

            keep_content_chroma_canvas(x, content)
        return x

    def _style_stats(self, style: StyleSpec, options: StylizeOptions, recolor: Any) -> list[Any]:
        out: list[Any] = [None] * len(style.paths)

        def done(job: _Job, value: Any) -> None:
            if isinstance(value, ImageError):
                raise value
            out[job.payload] = value

        def failed(job: _Job, why: str) -> None:
            raise ImageError(f"style {style.paths[job.payload]}: {why}")

        self._run([_Job(i) for i in range(len(style.paths))],
                  lambda a, j: a.style_statistics.remote(style.paths[j.payload], options, recolor), done, failed)  # fmt: skip
        return out

    def _tile_jobs(self, count: int) -> list[_Job]:
        """Contiguous runs of tile indices, about `TILE_JOBS_PER_WORKER` per actor."""
        per = max(1, -(-count // (max(1, len(self._actors)) * TILE_JOBS_PER_WORKER)))
        return [_Job(list(range(i, min(count, i + per)))) for i in range(0, count, per)]

    def _all(self, jobs: list[_Job], submit: Callable[[Any, _Job], Any], on_done: Callable[[_Job, Any], None],
             what: str, on_tile: TileCallback | None, total: int) -> None:  # fmt: skip
        """`_run` where every job must succeed (an image is all its tiles); progress in tiles."""
        done_tiles = 0

        def done(job: _Job, value: Any) -> None:
            nonlocal done_tiles
            on_done(job, value)
            done_tiles += len(job.payload) if isinstance(job.payload, list) else 1
            if on_tile:
                on_tile(what, done_tiles, total)

        def failed(job: _Job, why: str) -> None:
            raise TileJobError(f"{what}: tiles {job.payload} failed: {why}")

        self._run(jobs, submit, done, failed)

    def _stage(self, plan: StagePlan, src: ZarrCanvas, folder: Path, target: Target, options: StylizeOptions,
               keep: int | None, on_tile: TileCallback | None) -> ZarrCanvas:  # fmt: skip
        k, g = plan.stage, plan.grid
        c, h, w = src.shape
        method, alpha = options.method, options.alpha
        if plan.one_tile:  # the whole-image stage, on one worker
            dst = create_array(folder, (c, h, w), (h, w))
            self._all([_Job(0)], lambda a, j: a.whole_stage.remote(k, src.path, dst.path, plan, target, method, alpha),
                      lambda j, v: None, f"stage {k}", on_tile, 1)  # fmt: skip
            return dst
        channels = self.arch.feature_channels(k)
        enc = plan.encode_tiles()
        feats = None
        if plan.cache:  # chunk = an encode tile's core in feature pixels
            core = enc[0].scaled(g)
            feats = create_array(folder.with_name(folder.name + "_features"), (channels, plan.height // g, plan.width // g),
                                 (core.rows.size, core.cols.size))  # fmt: skip
        fpath = feats.path if feats is not None else None
        parts: list[Any] = [None] * len(enc)

        def got_stats(job: _Job, value: list[Any]) -> None:
            for i, s in zip(job.payload, value):
                parts[i] = s

        self._all(self._tile_jobs(len(enc)), lambda a, j: a.encode_tiles.remote(k, src.path, plan, fpath, j.payload, keep),
                  got_stats, f"stage {k} statistics", on_tile, len(enc))  # fmt: skip
        a_, b_ = target.fit(method, k, stats_sum(parts, channels), alpha)
        dec = plan.decode_tiles()
        scale = g if plan.cache else 1
        dst = create_array(folder, (c, h, w), (dec[0].rows.size * scale, dec[0].cols.size * scale))
        self._all(self._tile_jobs(len(dec)),
                  lambda a, j: a.decode_tiles.remote(k, src.path, dst.path, plan, a_, b_, fpath, j.payload, keep),
                  lambda j, v: None, f"stage {k} decode", on_tile, len(dec))  # fmt: skip
        if feats is not None:
            shutil.rmtree(feats.path, ignore_errors=True)
        return dst
