"""Ray scale-out on a local two-node cluster started here (every node bound to 127.0.0.1).

Batches: outputs byte-identical to the local batch's, a bad file fails alone,
a killed actor or a lost node still finishes every output once with nothing
partial left, and a killed driver's batch resumes with skip_existing. One
image across the cluster equals the single-machine tiled result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ultrastyle.core.plan import TilingOptions
from ultrastyle.runtime.batch import StylizeOptions, run_batch
from ultrastyle.runtime.pairs import BatchInterrupted, StyleSpec, plan_pairs

REPO = Path(__file__).resolve().parents[1]
LEVELS = (5, 4)


def _zarr_3() -> bool:
    try:
        import zarr
    except ImportError:
        return False
    return int(zarr.__version__.split(".")[0]) >= 3


# Where the [ray] extra leaves zarr out (Python 3.10), one image across the cluster is refused (tested below).
NEEDS_ZARR = pytest.mark.skipif(not _zarr_3(), reason="zarr 3 is not installed (it needs Python 3.11): distribute_tiles cannot run here")


def _ray():
    from ultrastyle.distributed.cluster import ClusterError, import_ray

    try:
        return import_ray(loopback=True)
    except ClusterError as exc:
        pytest.skip(f"Ray is not importable here ({exc}); the [ray] extra installs it")


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs and two worker nodes of one CPU each, all on 127.0.0.1; this process is the driver."""
    ray = _ray()
    from ray.cluster_utils import Cluster

    from ultrastyle.distributed.cluster import connect

    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, node_ip_address="127.0.0.1", include_dashboard=False))
    nodes = [c.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
    c.wait_for_nodes()
    try:
        assert connect(c.address)  # joins: the loopback address is kept (not turned into a routable one)
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        c.worker_nodes_list = nodes
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def folder(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small contents (c3 corrupt) and two styles."""
    d = tmp_path_factory.mktemp("ray_in")
    photos = sorted((shared_dir / "images/content").glob("*.jpg"))
    for i in range(5):
        with Image.open(photos[i % len(photos)]) as im:
            im.convert("RGB").resize((72 + 8 * i, 56), Image.Resampling.LANCZOS).save(d / f"c{i}.png")
    (d / "c3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for j, name in enumerate(("cd_style_in2.jpg", "cd_style_in1.jpg")):
        with Image.open(shared_dir / "images/style" / name) as im:
            im.convert("RGB").resize((64, 64)).save(d / f"s{j}.png")
    return d


@pytest.fixture(scope="module")
def pool(cluster, cd16x_dir: Path):
    from ultrastyle.distributed.pool import WorkerPool

    # Half a CPU per worker: a second driver (the killed-driver test) finds room beside this pool.
    with WorkerPool(cd16x_dir, address=cluster.address, workers=2, cpus_per_worker=0.5, backend="torch", stages=LEVELS) as p:
        yield p


OPTIONS = StylizeOptions(levels=LEVELS, tiling=TilingOptions(max_memory=None), io_workers=1)


def _pairs(folder: Path, out: Path) -> list:
    styles = [StyleSpec((folder / "s0.png",)), StyleSpec((folder / "s1.png",))]
    return plan_pairs(sorted(folder.glob("c*.png")), styles, out, "png")


@pytest.fixture(scope="module")
def local(folder: Path, cd16x_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """The local batch's outputs and results (the reference), one thread as each worker runs."""
    from ultrastyle.models.pretrained import load_model
    from ultrastyle.runtime.backends.torch_backend import TorchRunner

    out = tmp_path_factory.mktemp("ray_local")
    with TorchRunner(load_model(cd16x_dir, stages=LEVELS), threads=1) as r:
        summary = run_batch(r, _pairs(folder, out), OPTIONS)
    return out, summary.results


def _partials(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name.endswith(".ultrastyle-partial")]


def _same_as_local(local, out: Path, results) -> None:
    ref_dir, ref = local
    assert [(r.status, r.error) for r in results] == [(r.status, r.error.replace(str(ref_dir), str(out)) if r.error else None) for r in ref]
    done = [r.pair.output.name for r in ref if r.status == "done"]
    assert sorted(p.name for p in out.iterdir()) == sorted(done)  # every output once, nothing partial
    for name in done:
        assert (out / name).read_bytes() == (ref_dir / name).read_bytes(), name


def test_local_paths_never_import_ray(folder, cd16x_dir, tmp_path):
    code = textwrap.dedent(f"""
        import sys, ultrastyle, ultrastyle.cli.main
        s = ultrastyle.stylize_batch([{str(folder / "c0.png")!r}], [{str(folder / "s0.png")!r}], {str(tmp_path)!r},
                                     model={str(cd16x_dir)!r}, backend="torch", levels="5", max_memory=None)
        print(s.count("done"), "ray" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["1", "False"]


def test_batch_equals_the_local_batch_and_a_bad_file_fails_alone(pool, folder, local, tmp_path):
    pairs = _pairs(folder, tmp_path)
    seen = []
    summary = pool.run_batch(pairs, OPTIONS, on_result=seen.append)
    assert [r.pair for r in seen] == pairs  # results in pair order, each once
    assert summary.count("done") == 8 and summary.count("failed") == 2
    assert all("c3.png" in r.error for r in summary.results if r.status == "failed")
    _same_as_local(local, tmp_path, summary.results)
    assert {w.node for w in pool.workers} == {n.node_id for n in pool_nodes(pool)}  # spread over both nodes


def pool_nodes(pool):
    import ray

    return [type("N", (), {"node_id": n["NodeID"]}) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]


def test_skip_existing_skips_and_the_rest_run(pool, folder, local, tmp_path):
    pairs = _pairs(folder, tmp_path)
    ref_dir = local[0]
    (tmp_path / pairs[0].output.name).write_bytes((ref_dir / pairs[0].output.name).read_bytes())
    opts = StylizeOptions(**{**OPTIONS.__dict__, "skip_existing": True})
    summary = pool.run_batch(pairs, opts)
    assert summary.results[0].status == "skipped" and summary.count("done") == 7
    _same_as_local(local, tmp_path, [r if i else local[1][0] for i, r in enumerate(summary.results)])


def test_a_killed_actor_mid_batch_still_writes_every_output_once(pool, folder, local, tmp_path):
    pairs = _pairs(folder, tmp_path)
    victims = [w.pid for w in pool.workers]
    killed = []

    def kill_one(r) -> None:
        if not killed:  # the other actor is mid-job now
            os.kill(victims[-1], signal.SIGKILL)
            killed.append(victims[-1])

    summary = pool.run_batch(pairs, OPTIONS, on_result=kill_one)
    assert killed
    _same_as_local(local, tmp_path, summary.results)
    assert not _partials(tmp_path)


@NEEDS_ZARR
def test_one_image_across_the_cluster_equals_the_local_tiled_result(pool, folder, cd16x_dir, tmp_path):
    import torch

    from ultrastyle.core.canvas import canvas_from_array
    from ultrastyle.models.pretrained import load_model
    from ultrastyle.runtime.backends.torch_backend import TorchRunner
    from ultrastyle.runtime.batch import StyleBook
    from ultrastyle.runtime.decode import load_content
    from ultrastyle.runtime.tiled import canvas_to_image, stylize_tiled

    opts = StylizeOptions(levels=LEVELS, tiling=TilingOptions(tile=64), io_workers=1)
    src = folder / "c4.png"
    pixels, _ = load_content(src, opts)
    spec = StyleSpec((folder / "s0.png", folder / "s1.png"), weights=(0.7, 0.3))
    seen: list[tuple[str, int, int]] = []
    result = pool.stylize_image(pixels, spec, opts, tmp_path / "work", on_tile=lambda *t: seen.append(t))
    got = result.numpy()
    with TorchRunner(load_model(cd16x_dir, stages=LEVELS), threads=1) as r:
        book = StyleBook(r, opts)
        from ultrastyle.core.styles import Target

        target = Target(tuple(book.get(p) for p in spec.paths), spec.weights)
        with canvas_from_array(pixels) as content, stylize_tiled(r, content, target, opts.tiling_for(r.traits),
                                                                 method=opts.method, alpha=opts.alpha, levels=LEVELS) as ref:  # fmt: skip
            want = ref.numpy()
            want8 = canvas_to_image(ref)
    assert max(t[2] for t in seen if t[0] == "stage 4 decode") > 1  # several tiles, spread over the actors
    err = np.abs(got - want)
    assert err.max() <= 1e-4, (err.max(), err.mean())
    assert np.array_equal(canvas_to_image(result), want8)
    assert torch.from_numpy(got).isfinite().all()


@NEEDS_ZARR
def test_distribute_tiles_batch_writes_the_local_outputs(pool, folder, local, tmp_path):
    out = tmp_path / "not" / "made yet"  # made as the local batch makes it
    pairs = [p for p in _pairs(folder, out) if p.content.name in ("c0.png", "c3.png")]
    summary = pool.run_batch(pairs, OPTIONS, distribute_tiles=True)
    assert [r.status for r in summary.results] == ["done", "done", "failed", "failed"]
    ref_dir = local[0]
    for r in summary.results[:2]:
        a = np.asarray(Image.open(r.pair.output))
        b = np.asarray(Image.open(ref_dir / r.pair.output.name))
        assert np.array_equal(a, b)
    assert not _partials(out)



def test_a_full_disk_stops_the_batch_at_the_contents_not_yet_begun(pool, folder, local, tmp_path, monkeypatch):
    """A worker reports the output whose write found its disk full (`StylizeWorker.stylize_pairs`, tested in
    test_disk_full.py; a real full disk cannot be made here): the driver runs no content not yet begun."""
    import errno

    pairs = _pairs(folder, tmp_path)
    real = pool._run

    def run(jobs, submit, on_done, on_failed, skip=None):
        if skip is None:  # the style statistics
            return real(jobs, submit, on_done, on_failed)

        def done(job, value):  # the first job back says its disk filled up
            got, full = value
            on_done(job, (got, full if done.told else (got[0].pair.output, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))))
            done.told = True

        done.told = False
        return real(jobs, submit, done, on_failed, skip)

    monkeypatch.setattr(pool, "_run", run)
    summary = pool.run_batch(pairs, OPTIONS)
    began = [r for r in summary.results if not (r.error or "").startswith("not made: no room is left")]
    # The contents the actors began (two, or one while a replacement for an actor killed earlier is still starting),
    # in pair order; the rest never ran.
    assert summary.results[: len(began)] == began and len(began) in (2, 4) and summary.count("done") == len(began)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(r.pair.output.name for r in began)
    assert len(summary.results) == len(pairs)


@NEEDS_ZARR
def test_a_full_disk_stops_a_distribute_tiles_batch(pool, folder, tmp_path, monkeypatch):
    """There the driver writes: its first write to a full disk stops every later image before its tiles."""
    import errno

    from ultrastyle.distributed import pool as pool_module
    from ultrastyle.io.images import ImageError

    def full(image, path, *a, **k):
        raise ImageError(f"{path}: cannot write the image") from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    images = []
    real = pool.stylize_image
    monkeypatch.setattr(pool_module, "save_output", full)
    monkeypatch.setattr(pool, "stylize_image", lambda *a, **k: images.append(1) or real(*a, **k))
    pairs = [p for p in _pairs(folder, tmp_path) if p.content.name in ("c0.png", "c1.png")]
    summary = pool.run_batch(pairs, OPTIONS, distribute_tiles=True)
    assert len(images) == 1 and [r.status for r in summary.results] == ["failed"] * 4
    assert "cannot write the image" in summary.results[0].error
    assert all(r.error.startswith("not made: no room is left on the disk of") for r in summary.results[1:])
    assert not _partials(tmp_path) and not list(tmp_path.iterdir())

@pytest.mark.slow
def test_a_killed_driver_resumes_with_skip_existing(pool, cluster, folder, local, cd16x_dir, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from ultrastyle.distributed.pool import WorkerPool
        from ultrastyle.runtime.batch import StylizeOptions
        from ultrastyle.runtime.pairs import StyleSpec, plan_pairs
        from ultrastyle.core.plan import TilingOptions
        folder, out = Path({str(folder)!r}), Path({str(tmp_path)!r})
        pairs = plan_pairs(sorted(folder.glob("c*.png")), [StyleSpec((folder / "s0.png",)), StyleSpec((folder / "s1.png",))], out, "png")
        opts = StylizeOptions(levels={LEVELS!r}, tiling=TilingOptions(max_memory=None), io_workers=1)
        def die(r):
            if r.status == "done":
                os.kill(os.getpid(), signal.SIGKILL)
        with WorkerPool({str(cd16x_dir)!r}, address={cluster.address!r}, workers=2, cpus_per_worker=0.5, backend="torch", stages={LEVELS!r}) as p:
            p.run_batch(pairs, opts, on_result=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    before = {p.name for p in tmp_path.iterdir() if not p.name.endswith(".ultrastyle-partial")}
    assert before  # at least the first output was written before the kill
    opts = StylizeOptions(**{**OPTIONS.__dict__, "skip_existing": True})
    summary = pool.run_batch(_pairs(folder, tmp_path), opts)
    assert {r.pair.output.name for r in summary.results if r.status == "skipped"} == before
    ref = {r.pair.output.name: r for r in local[1]}
    assert all(r.status == ref[r.pair.output.name].status for r in summary.results if r.status != "skipped")
    _same_as_local(local, tmp_path, [ref[r.pair.output.name] if r.status == "skipped" else r for r in summary.results])


def test_distribute_tiles_needs_ray_and_executor_is_checked(folder, tmp_path):
    from typer.testing import CliRunner

    import ultrastyle
    from ultrastyle.api import OptionError
    from ultrastyle.cli.main import app

    res = CliRunner().invoke(app, ["stylize", str(folder / "c0.png"), str(folder / "s0.png"), "-o", str(tmp_path), "--distribute-tiles"])
    assert res.exit_code == 2 and "--ray" in res.output
    with pytest.raises(OptionError) as exc:
        ultrastyle.stylize_batch([folder / "c0.png"], [folder / "s0.png"], tmp_path, executor="dask")
    assert exc.value.option == "executor"
    with pytest.raises(OptionError) as exc:
        ultrastyle.stylize_batch([folder / "c0.png"], [folder / "s0.png"], tmp_path, distribute_tiles=True)
    assert exc.value.option == "distribute_tiles"


def test_cluster_stylizer_equals_the_local_batch_and_reopens_after_close(cluster, folder, local, cd16x_dir, tmp_path):
    import ultrastyle

    cs = ultrastyle.ClusterStylizer(cd16x_dir, address=cluster.address, workers=1, cpus_per_worker=0.5, backend="torch",
                                    threads=1, levels=LEVELS)  # fmt: skip
    settings = dict(levels=LEVELS, max_memory=None, io_workers=1)
    with cs:
        first = cs.stylize_batch([folder / "c0.png"], [folder / "s0.png"], tmp_path / "a", **settings)
    # After its with block (or close), as a Stylizer's networks: the next call starts the pool again.
    again = cs.stylize_batch([folder / "c0.png"], [folder / "s0.png"], tmp_path / "b", **settings)
    cs.close()
    ref = (local[0] / "c0_stylized_s0.png").read_bytes()
    # Ctrl-C (here: raised from the first result's callback): busy actors are killed, their outputs abandoned.
    def stop(result) -> None:
        raise KeyboardInterrupt

    with cs, pytest.raises(BatchInterrupted) as info:
        cs.stylize_batch([folder / "c0.png", folder / "c1.png"], [folder / "s0.png"], tmp_path / "c", on_result=stop, **settings)
    assert info.value.abandoned and len(info.value.summary.results) >= 1
    assert not _partials(tmp_path / "c")
    for summary, out in ((first, tmp_path / "a"), (again, tmp_path / "b")):
        assert [r.status for r in summary.results] == ["done"], summary.results
        assert (out / "c0_stylized_s0.png").read_bytes() == ref


def test_the_address_probe_bounds_a_hanging_name_lookup_and_checks_the_port(monkeypatch):
    import socket
    import threading

    from ultrastyle.distributed.cluster import ClusterError, probe

    asked, answer = threading.Event(), threading.Event()

    def hanging(*args, **kwargs):  # a resolver that answers only once the test lets it: after the probe gave up
        asked.set()
        answer.wait(30)
        raise socket.gaierror("too late")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        with pytest.raises(ClusterError, match="ray-head.example does not resolve .*within 0.3 s"):
            probe("ray-head.example:6379", timeout=0.3)
        assert asked.is_set() and not answer.is_set()  # it gave up while the lookup still hung
    finally:
        answer.set()
    with pytest.raises(ClusterError, match="out of range"):
        probe("127.0.0.1:70000")
    for passed_to_ray in ("local", "auto", "::1", "ray://[::1]"):
        probe(passed_to_ray)  # Ray's own parsing says what is wrong with these (nothing is contacted here)
    for not_an_address in ("foo", "127.0.0.1:notaport", ":6379"):  # Ray said "ValueError: Invalid address format: foo"
        with pytest.raises(ClusterError, match=f"'{not_an_address}' is not a Ray address: expected 'local'"):
            probe(not_an_address)


def test_an_address_where_nothing_listens_is_refused_at_once(folder, cd16x_dir, tmp_path):
    import socket

    _ray()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # a port nothing listens on
    # Its own process: this module's driver is already connected, and a connected process keeps its cluster.
    # "At once": refused before ray.init, whose own connection attempts retried for minutes; reaching it ends the process.
    argv = ["ultrastyle", "stylize", str(folder / "c0.png"), "--style", str(folder / "s0.png"), "-o", str(tmp_path / "out"),
            "--model", str(cd16x_dir), "--ray", f"127.0.0.1:{port}"]  # fmt: skip
    code = textwrap.dedent(f"""
        import os, runpy, sys
        import ultrastyle.distributed.cluster as cluster

        def init(*args, **kwargs):
            sys.stderr.write("ray.init was reached: Ray's own retries would run\\n")
            sys.stderr.flush()
            os._exit(97)

        def import_ray(*args, **kwargs):
            ray = real_import_ray(*args, **kwargs)
            ray.init = init
            return ray

        real_import_ray, cluster.import_ray = cluster.import_ray, import_ray
        sys.argv = {argv!r}
        runpy.run_module("ultrastyle.cli.main", run_name="__main__")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "ray.init was reached" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert f"nothing answers on port {port}" in " ".join(done.stderr.split()), done.stderr
    assert "or use --ray local" in " ".join(done.stderr.split()), done.stderr  # the flag, not the library's keyword
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_lost_node_mid_batch_still_writes_every_output_once(pool, cluster, folder, local, tmp_path):
    """Runs last: it takes a worker node away from the module's cluster."""
    pairs = _pairs(folder, tmp_path)
    gone = []

    def drop_node(r) -> None:
        if not gone:
            victim = next(n for n in cluster.worker_nodes_list if n.node_id == pool.workers[-1].node)
            cluster.remove_node(victim, allow_graceful=False)
            gone.append(victim)

    summary = pool.run_batch(pairs, OPTIONS, on_result=drop_node)
    assert gone
    _same_as_local(local, tmp_path, summary.results)
    assert not _partials(tmp_path)


def test_a_worker_that_cannot_open_the_model_keeps_the_fix_its_error_suggests(tmp_path, monkeypatch):
    """The driver raises the worker's error with its remedy, so the command line prints the command (not the Python call)."""
    from ultrastyle.cli.remedies import as_command
    from ultrastyle.distributed.worker import RunnerSpec, StylizeWorker
    from ultrastyle.errors import Remedy, remedied

    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path))
    worker = StylizeWorker(RunnerSpec("no-such-model"), {})  # in this process: the actor's constructor
    assert worker.runner is None and "unknown model 'no-such-model'" in worker.error
    assert worker.remedy == Remedy("list_models")
    exc = remedied(RuntimeError(f"the Ray workers cannot open the model no-such-model: {worker.error}"), worker.remedy)  # as the pool raises it
    assert "(described by ultrastyle models list)" in as_command(exc)


def test_bad_pool_settings_are_refused_before_ray_starts(monkeypatch, cd16x_dir):
    from ultrastyle.api import ClusterStylizer
    from ultrastyle.distributed import pool
    from ultrastyle.options import OptionError

    def no_ray(address):
        raise AssertionError(f"Ray was started for {address} with settings that were bound to fail")

    monkeypatch.setattr(pool, "connect", no_ray)
    for kw, option in (({"backend": "bogus"}, "backend"), ({"precision": "fp64"}, "precision"), ({"threads": -2}, "threads"),
                       ({"workers": 0}, "workers"), ({"cpus_per_worker": 0}, "cpus_per_worker")):  # fmt: skip
        with pytest.raises(OptionError) as info:
            ClusterStylizer(cd16x_dir, address="local", levels=(5,), **kw)
        assert info.value.option == option, info.value


def test_compile_reaches_every_worker_runner(tmp_path, cd16x_dir, monkeypatch):
    """``compile=True`` goes from `ClusterStylizer` into the workers' `RunnerSpec` (it was once dropped without a word),
    and a worker opens its runner with it (ONNX Runtime refuses it there)."""
    import types

    from ultrastyle.api import ClusterStylizer
    from ultrastyle.distributed import pool
    from ultrastyle.distributed.worker import RunnerSpec, StylizeWorker

    class Started(Exception):
        pass

    def start(self, workers):
        self.started_with = self.spec
        raise Started(self.spec)

    monkeypatch.setattr(pool, "connect", lambda address: False)  # no Ray: the pool is stopped where its actors would start
    monkeypatch.setattr(pool, "import_ray", lambda loopback: types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0}))
    monkeypatch.setattr(pool.WorkerPool, "_start", start)
    monkeypatch.setattr(pool.WorkerPool, "close", lambda self: None)
    with pytest.raises(Started) as info:
        ClusterStylizer(cd16x_dir, address="local", levels=(5,), backend="torch", compile=True)
    assert info.value.args[0].compile is True and info.value.args[0].backend == "torch"
    worker = StylizeWorker(RunnerSpec(str(cd16x_dir), backend="onnxruntime", stages=(5,), compile=True), {})
    assert worker.runner is None and "compile=True runs the torch backend" in worker.error, worker.error


def test_after_ctrl_c_the_summary_counts_every_output_on_disk(pool, folder, tmp_path):
    """A job cut off by Ctrl-C may have written some of its content's outputs whole: they are done, not abandoned."""

    def ctrl_c(r):
        if r.status == "done":
            raise KeyboardInterrupt

    with pytest.raises(BatchInterrupted) as info:
        pool.run_batch(_pairs(folder, tmp_path), OPTIONS, on_result=ctrl_c)
    done = {r.pair.output.name for r in info.value.summary.results if r.status == "done"}
    assert done and done == {p.name for p in tmp_path.iterdir()}, (done, sorted(p.name for p in tmp_path.iterdir()))


@NEEDS_ZARR
def test_distribute_tiles_with_preserve_color_match_equals_the_local_batch(pool, folder, cd16x_dir, tmp_path):
    """Matched styles are recoloured per content, so the style table holds none of them (it once raised KeyError)."""
    from ultrastyle.models.pretrained import load_model
    from ultrastyle.runtime.backends.torch_backend import TorchRunner

    opts = StylizeOptions(**{**OPTIONS.__dict__, "preserve_color": "match"})
    pairs = [p for p in _pairs(folder, tmp_path / "ray") if p.content.name == "c0.png"]
    summary = pool.run_batch(pairs, opts, distribute_tiles=True)
    assert [r.status for r in summary.results] == ["done", "done"], [r.error for r in summary.results]
    with TorchRunner(load_model(cd16x_dir, stages=LEVELS), threads=1) as r:
        run_batch(r, [p for p in _pairs(folder, tmp_path / "local") if p.content.name == "c0.png"], opts)
    for p in pairs:
        a, b = np.asarray(Image.open(p.output), np.int16), np.asarray(Image.open(tmp_path / "local" / p.output.name), np.int16)
        assert np.abs(a - b).max() <= 1, p.output.name  # the tiled cascade's tiles are a single machine's


def test_joining_ray_keeps_the_process_signal_handlers(monkeypatch):
    """ray.init installs its own SIGINT/SIGTERM handlers, which would end the command line without its clean-up (SIGTERM: an abort)."""
    import types

    from ultrastyle.distributed import cluster

    mine = lambda signum, frame: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, mine)
    try:
        fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        monkeypatch.setattr(cluster, "import_ray", lambda loopback: fake)
        assert cluster.connect("local") is True
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_masked_outputs_spread_over_the_cluster_are_refused_before_ray_starts(folder, tmp_path, monkeypatch):
    import ultrastyle
    from ultrastyle.api import OptionError
    from ultrastyle.distributed import pool

    monkeypatch.setattr(pool, "connect", lambda address: pytest.fail("Ray was started"))
    with pytest.raises(OptionError, match=r"not spread over the cluster \(distribute_tiles\)") as info:
        ultrastyle.stylize_batch([folder / "c0.png"], [folder / "s0.png", folder / "s1.png"], tmp_path, mask=folder / "c0.png",
                                 executor="ray", distribute_tiles=True)  # fmt: skip
    assert info.value.option == "mask"
    with pytest.raises(OptionError, match="executor='ray'") as info:
        ultrastyle.stylize_batch([folder / "c0.png"], [folder / "s0.png"], tmp_path, workers=2)
    assert info.value.option == "workers"


def test_a_gpu_pool_on_a_local_instance_without_gpus_is_refused_at_once(monkeypatch, cd16x_dir):
    import types

    from ultrastyle.distributed import pool
    from ultrastyle.distributed.cluster import ClusterError

    monkeypatch.setattr(pool, "connect", lambda address: False)
    monkeypatch.setattr(pool, "import_ray", lambda loopback: types.SimpleNamespace(cluster_resources=lambda: {"CPU": 8.0},
                                                                            is_initialized=lambda: False))
    monkeypatch.setattr(pool.WorkerPool, "_start", lambda self, n: pytest.fail("actors were started to wait for a GPU"))
    with pytest.raises(ClusterError, match="has no GPU") as info:
        pool.WorkerPool(cd16x_dir, address="local", device="cuda", stages=(5,))
    assert "device='cpu'" in str(info.value)


def test_without_ray_the_pool_says_to_install_the_extra(monkeypatch, cd16x_dir):
    """A refusal from connect (Ray missing) is not taken for a Ctrl-C inside ray.init, whose clean-up imports Ray."""
    from ultrastyle.distributed import pool
    from ultrastyle.distributed.cluster import ClusterError

    def missing(address):
        raise ClusterError("Ray is not installed (No module named 'ray'); install the extra: pip install 'ultrastyle[ray]'")

    monkeypatch.setattr(pool, "connect", missing)
    monkeypatch.setattr(pool, "disconnect", lambda: pytest.fail("disconnect imports Ray"))
    with pytest.raises(ClusterError, match="install the extra"):
        pool.WorkerPool(cd16x_dir, address="local", stages=(5,))



@pytest.mark.parametrize("zarr", [None, "2.18.3"], ids=["missing", "zarr-2"])
def test_without_zarr_3_distribute_tiles_is_refused_before_ray_starts(zarr, monkeypatch, cd16x_dir, tmp_path):
    """Ray installed by hand (zarr 3 needs Python 3.11: on 3.10 the extra leaves it out) gave a traceback once the pool
    had started and the first image's tiles began."""
    import types

    from typer.testing import CliRunner

    from ultrastyle.api import ClusterStylizer
    from ultrastyle.cli.main import app
    from ultrastyle.distributed import pool
    from ultrastyle.distributed.cluster import ClusterError

    monkeypatch.setitem(sys.modules, "zarr", None if zarr is None else types.SimpleNamespace(__version__=zarr))
    monkeypatch.setattr(pool, "connect", lambda address: pytest.fail("Ray started"))
    with pytest.raises(ClusterError, match=r"keeps its stages in zarr 3 arrays, but zarr .*pip install 'ultrastyle\[ray\]'"):
        ClusterStylizer(cd16x_dir, address="local", distribute_tiles=True, levels=(5,))
    # Without distribute_tiles zarr is not needed: the pool starts (here: stopped where Ray would start).
    with pytest.raises(pytest.fail.Exception, match="Ray started"):
        ClusterStylizer(cd16x_dir, address="local", levels=(5,))
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    r = CliRunner().invoke(app, ["stylize", str(image), "--style", str(image), "-o", str(tmp_path / "out"),
                                 "--model", str(cd16x_dir), "--ray", "local", "--distribute-tiles"])  # fmt: skip
    assert r.exit_code == 2 and "zarr 3 arrays" in r.output and "Traceback" not in r.output, r.output

def test_a_cluster_gets_absolute_paths_whatever_folder_its_workers_run_in(monkeypatch, tmp_path):
    import numpy as np

    from ultrastyle.api import ClusterStylizer, make_options
    from ultrastyle.core.plan import TilingOptions
    from ultrastyle.io.sources import ImageInput
    from ultrastyle.models.defaults import ModelDefaults
    from ultrastyle.runtime.pairs import Pair, StyleSpec

    monkeypatch.chdir(tmp_path)
    sent = {}

    class Pool:
        def run_batch(self, pairs, opts, on_result, on_tile, *, distribute_tiles, scratch):
            sent.update(pairs=pairs, opts=opts, scratch=scratch)

    cluster = ClusterStylizer.__new__(ClusterStylizer)  # no Ray: what goes to the pool is the question
    cluster.pool, cluster.distribute_tiles = Pool(), False
    grey = ImageInput(np.zeros((4, 4, 3), np.uint8), "content")
    pairs = [Pair(Path("in/c.jpg"), StyleSpec((Path("s.jpg"), Path("t.jpg")), mask=Path("m.png")), Path("out/c_stylized_s.png")),
             Pair(grey, StyleSpec((Path("s.jpg"),)), Path("out/content_stylized_s.png"))]  # fmt: skip
    opts = make_options(ModelDefaults("wct", (5, 4), 0.6))
    opts = type(opts)(**{**opts.__dict__, "tiling": TilingOptions(max_memory=2**30, scratch_dir=Path("scratch"))})
    cluster._run_batch(pairs, opts, None, None)
    # A joined head's workers run in the folder `ray start` ran in: relative outputs went there, relative inputs were not found.
    first, second = sent["pairs"]
    assert first.content == tmp_path / "in/c.jpg" and first.output == tmp_path / "out/c_stylized_s.png"
    assert first.style.paths == (tmp_path / "s.jpg", tmp_path / "t.jpg") and first.style.mask == tmp_path / "m.png"
    assert second.content is grey and sent["scratch"] == tmp_path / "scratch" == sent["opts"].tiling.scratch_dir


def test_ray_starts_with_stop_signals_blocked_so_its_processes_leave_a_group_signal_to_the_driver(monkeypatch):
    """A scheduler's SIGTERM (or a terminal's Ctrl-C) to the process group killed Ray's processes first, and the driver hung
    a minute on a dead GCS; a Ctrl-C while Ray started was lost. What Ray spawns inherits the mask in force during init."""
    import types

    from ultrastyle.distributed import cluster

    seen = {}

    def init(**kw):  # what Ray's spawned processes would inherit
        seen["mask"] = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C during the start: pending, not lost

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setattr(cluster, "import_ray", lambda loopback: fake)
    monkeypatch.setattr(cluster, "probe", lambda address: None)
    got: list[int] = []
    before = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        cluster.connect("local")
        for _ in range(100):  # the handler runs at the interpreter's next check
            if got:
                break
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, before)
    assert got == [signal.SIGINT]  # the pending Ctrl-C is delivered once the start is over
    assert {signal.SIGINT, signal.SIGTERM} <= set(seen["mask"])
    assert not {signal.SIGINT, signal.SIGTERM} & set(signal.pthread_sigmask(signal.SIG_BLOCK, []))  # unblocked after


def test_a_join_that_fails_where_a_ray_token_exists_says_how_to_join_with_it(monkeypatch, tmp_path):
    import types

    from ultrastyle.distributed import cluster

    monkeypatch.setattr(cluster.Path, "home", lambda: tmp_path)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)

    def init(**kw):
        raise ConnectionError("GCS has not been started")  # what a token-authenticated head gives a driver without one

    monkeypatch.setattr(cluster, "import_ray", lambda loopback: types.SimpleNamespace(is_initialized=lambda: False, init=init))
    monkeypatch.setattr(cluster, "probe", lambda address: None)
    with pytest.raises(cluster.ClusterError) as info:
        cluster.connect("127.0.0.1:6390")
    assert "token" not in str(info.value)  # no token here: nothing to say of one
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    with pytest.raises(cluster.ClusterError, match="uses token authentication, which a driver joins only with RAY_AUTH_MODE=token"):
        cluster.connect("127.0.0.1:6390")


def test_more_local_workers_than_cpus_are_refused_rather_than_waited_for(cd16x_dir, monkeypatch):
    import types

    from ultrastyle.distributed import pool
    from ultrastyle.distributed.cluster import ClusterError

    fake = types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0}, is_initialized=lambda: False)  # a local instance of 2 CPUs
    monkeypatch.setattr(pool, "connect", lambda address: False)
    monkeypatch.setattr(pool, "import_ray", lambda loopback: fake)
    with pytest.raises(ClusterError, match="5 workers of 1 CPU each are more than this machine's 2 CPUs hold; give at most 2 workers"):
        pool.WorkerPool(cd16x_dir, address="local", workers=5)  # the pool waited 30 s for actors that could never start
    with pytest.raises(ClusterError, match="give at most 4 workers"):
        pool.WorkerPool(cd16x_dir, address="local", workers=5, cpus_per_worker=0.5)


def test_a_local_instance_starts_without_rays_token_notice(monkeypatch, caplog):
    """Ray 2.60 logs a token-authentication notice at every new local instance; token authentication stays on."""
    import logging
    import types

    from ultrastyle.distributed import cluster

    ray_log = logging.getLogger(cluster._TOKEN_LOGGER)

    def init(**kw):
        ray_log.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        ray_log.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")

    monkeypatch.setattr(cluster, "import_ray", lambda loopback: types.SimpleNamespace(is_initialized=lambda: False, init=init))
    monkeypatch.setattr(cluster, "probe", lambda address: None)
    with caplog.at_level(logging.WARNING, logger=cluster._TOKEN_LOGGER):
        cluster.connect("local")
        assert [r.getMessage()[:35] for r in caplog.records] == ["Token authentication is disabled fo"]  # the warning stays
        caplog.clear()
        cluster.connect("127.0.0.1:6390")  # a cluster joined: Ray's word on it is kept
        assert len(caplog.records) == 2
        ray_log.warning("Token authentication is enabled later")
        assert len(caplog.records) == 3  # the filter is gone after the start
