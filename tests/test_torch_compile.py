"""``torch.compile`` stage networks (`StageEngine(compile=True)`) on the CPU, against the eager float32 reference.

Inductor compiles C++ here (gcc), slowly: one stage's networks at one tile
size, marked slow. What is checked: compiled results equal eager ones,
one compile per network and input shape (a repeated shape reuses it, a new
one compiles, past ``max_shapes`` a shape runs eagerly with a warning), and
the on-disk cache under the ultrastyle home, which a second process hits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.torch_engine import COMPILE_CACHE_ENV, StageEngine, compile_cache_dir, configure_compile_cache

# A compiled float32 network against the eager one: the same arithmetic in another order (and the affine
# map folded into the first convolution): measured 1e-6; this allows for another CPU's kernels.
COMPILE_TOL = 1e-4


def test_compile_cache_folder_is_under_the_home_and_respects_the_users(tmp_path, monkeypatch):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    folder = configure_compile_cache()
    assert folder == compile_cache_dir() and folder.is_dir() and os.environ[COMPILE_CACHE_ENV] == str(folder)
    assert folder.relative_to(os.environ["ULTRASTYLE_HOME"])  # the test's isolated home
    mine = tmp_path / "mine"
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(mine))
    assert configure_compile_cache() == mine  # a folder the user chose is kept
    assert configure_compile_cache(tmp_path / "x") == tmp_path / "x"  # an explicit one wins


def test_compile_builds_nothing_until_called(cd16x_dir, monkeypatch):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    engine = StageEngine(load_cd_folder(cd16x_dir, stages=(1,)), compile=True)
    assert engine.fuse_affine and engine.compile_count() == 0 and engine.cache_dir == compile_cache_dir()


_SECOND_PROCESS = """
import json, sys, torch
from torch._dynamo.utils import counters
from ultrastyle.models.pretrained import load_cd_folder
from ultrastyle.runtime.backends.torch_engine import StageEngine
engine = StageEngine(load_cd_folder(sys.argv[1], stages=(1,)), compile=True)
engine.encode(1, torch.rand(1, 3, 32, 40))
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_compiled_stage_equals_eager_and_compiles_once_per_shape(cd16x_dir, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    model = load_cd_folder(cd16x_dir, stages=(1,))
    engine = StageEngine(model, compile=True, max_shapes=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 40, generator=gen)
    c = model.arch.feature_channels(1)
    a = torch.eye(c, dtype=torch.float64) * 0.8 + torch.randn(c, c, generator=gen, dtype=torch.float64) * 0.05
    b = torch.randn(c, generator=gen, dtype=torch.float64) * 0.1

    f = engine.encode(1, x)
    y = engine.decode(1, f, a, b)
    ref_f = model.encode(1, x)
    ref_y = model.decode(1, ref_f, a, b)
    df, dy = (f - ref_f).abs().max().item(), (y - ref_y).abs().max().item()
    print(f"compiled vs eager: features max {df:.2e}, image max {dy:.2e}")
    assert df <= COMPILE_TOL * max(1.0, ref_f.abs().max().item()) and dy <= COMPILE_TOL
    assert engine.compile_count() == 2 and engine.shapes["encoder1"] == {(1, 3, 32, 40)}
    graphs = counters["stats"]["unique_graphs"]

    # The same shape (a new map too): no new graph. Cores are cut from the whole tile's output.
    a2 = a * 0.9
    assert torch.equal(engine.decode_core(1, f, a2, b, slice(3, 20), slice(0, 40)), engine.decode(1, f, a2, b)[..., 3:20, :])
    assert counters["stats"]["unique_graphs"] == graphs and engine.compile_count() == 2

    # A second shape compiles; a third exceeds max_shapes=2 and runs eagerly, with one warning.
    x2 = torch.rand(1, 3, 16, 24, generator=gen)
    torch.testing.assert_close(engine.encode(1, x2), model.encode(1, x2), rtol=0, atol=COMPILE_TOL * 10)
    assert counters["stats"]["unique_graphs"] == graphs + 1 and len(engine.shapes["encoder1"]) == 2
    x3 = torch.rand(1, 3, 8, 8, generator=gen)
    with pytest.warns(UserWarning, match="max_shapes=2"):
        out = engine.encode(1, x3)
    assert torch.equal(out, model.encode(1, x3))  # the eager network itself
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.encode(1, torch.rand(1, 3, 8, 16))
    assert not [w for w in caught if "max_shapes" in str(w.message)]  # warned once per network
    assert counters["stats"]["unique_graphs"] == graphs + 1 and len(engine.shapes["encoder1"]) == 2

    # The on-disk cache: written under the ultrastyle home, and a fresh process compiling the same graph hits it.
    folder = compile_cache_dir()
    assert engine.cache_dir == folder and any(folder.iterdir())
    # The same thread count as this process: Inductor's CPU kernels (and so the cache key) depend on it.
    env = {**os.environ, COMPILE_CACHE_ENV: str(folder), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, str(cd16x_dir)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    stats = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"second process: {stats}")
    assert stats.get("fxgraph_cache_hit", 0) >= 1 and stats.get("fxgraph_cache_miss", 0) == 0


@pytest.mark.slow
def test_one_shape_compiles_once_whatever_the_inputs_strides_and_inference_mode(cd16x_dir):
    """Dynamo guards on strides and dispatch keys too: a channels-last feature tile, or a plain tensor after an inference
    one (a cascade's first stage, then a later one), compiled a shape already compiled again."""
    from torch._dynamo.utils import counters

    engine = StageEngine(load_cd_folder(cd16x_dir, stages=(1,)), compile=True)
    graphs = lambda: int(counters["stats"]["unique_graphs"])  # noqa: E731
    x = torch.rand(1, 3, 32, 40)
    with torch.inference_mode():
        x_inference = x.clone()
    f = engine.encode(1, x)
    a, b = torch.eye(f.shape[1], dtype=torch.float64), torch.zeros(f.shape[1], dtype=torch.float64)
    y = engine.decode(1, f, a, b)
    before = graphs()
    assert torch.equal(engine.encode(1, x_inference), f)  # an inference tensor after a plain one
    f_last = f.contiguous(memory_format=torch.channels_last)  # as a tile of a channels-last feature canvas
    assert f_last.stride() != f.stride() and torch.equal(engine.decode(1, f_last, a, b), y)
    assert graphs() == before and engine.compile_count() == 2
