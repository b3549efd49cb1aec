"""The Python API's ``**settings`` are typed (`api.BatchSettings` and kin, for editors and type checkers): the typed
keys and their types stay those of `make_options` and `Stylizer`, which check them at run time."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ultrastyle import api
from ultrastyle.optimization import run
from ultrastyle.optimization.batch import optimize_batch

ROLES = {"skip_existing", "shard"}  # a batch's own (`load` and `stylize` refuse them)


def _types(typed: type) -> dict[str, str]:
    """A TypedDict's keys and their types as written (the modules' annotations are strings: `from __future__`)."""
    return {k: getattr(v, "__forward_arg__", v) for k, v in typed.__annotations__.items()}


def _params(function: object, leave_out: set[str] = set()) -> dict[str, str]:  # noqa: B006 - read only
    return {n: p.annotation for n, p in inspect.signature(function).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in leave_out}  # fmt: skip


def test_the_typed_settings_are_make_options_keywords_with_their_types():
    options = _params(api.make_options)
    assert _types(api.BatchSettings) == options
    assert _types(api.ImageSettings) == {k: v for k, v in options.items() if k not in ROLES}
    assert _types(api.CallSettings) == {k: v for k, v in options.items() if k not in ROLES | {"levels"}}


def test_the_typed_runner_settings_are_the_stylizer_s_keywords_with_their_types():
    stylizer = _params(api.Stylizer.__init__)
    runner = _types(api.RunnerSettings)
    assert set(runner) == set(api._RUNNER_KEYS)
    assert runner == {k: stylizer[k] for k in runner}
    assert _types(api.OneImageSettings) == {**_types(api.ImageSettings), **runner}
    assert _types(api.OneBatchSettings) == {**_types(api.BatchSettings), **runner}


@pytest.mark.parametrize(("function", "typed"), [
    (api.Stylizer.__init__, "CallSettings"), (api.Stylizer.stylize, "ImageSettings"), (api.Stylizer.stylize_batch, "BatchSettings"),
    (api.Stylizer.options, "BatchSettings"), (api.ClusterStylizer.__init__, "CallSettings"), (api.stylize, "OneImageSettings"),
    (api.stylize_batch, "OneBatchSettings"),
])  # fmt: skip
def test_each_call_s_settings_are_typed_and_none_is_also_a_named_keyword(function, typed):
    params = inspect.signature(function).parameters
    (var,) = [p for p in params.values() if p.kind is p.VAR_KEYWORD]
    assert var.annotation == f"Unpack[{typed}]"
    named = {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
    assert not named & set(_types(getattr(api, typed)))  # a key also named would be two ways to give one setting


def test_the_typed_signatures_resolve_at_run_time():
    """Tools that read hints at run time (typing.get_type_hints, pydantic, documentation builders) resolve every name."""
    import typing

    for function in (api.Stylizer.__init__, api.Stylizer.stylize, api.Stylizer.stylize_batch, api.stylize, api.stylize_batch,
                     run.Optimizer.run, run.optimize, optimize_batch):  # fmt: skip
        hints = typing.get_type_hints(function, include_extras=True)
        assert "settings" in hints and typing.get_origin(hints["settings"]).__name__ == "Unpack", function
        assert inspect.signature(function, eval_str=True).parameters["settings"].annotation == hints["settings"]


def test_the_optimize_calls_settings_are_make_optimize_options_keywords_typed():
    assert _types(run.OptimizeSettings) == _params(run.make_optimize_options)
    for function in (run.Optimizer.run, run.optimize, optimize_batch):
        params = inspect.signature(function).parameters
        (var,) = [p for p in params.values() if p.kind is p.VAR_KEYWORD]
        assert var.annotation == "Unpack[OptimizeSettings]"
        assert not {n for n, p in params.items() if p.kind is not p.VAR_KEYWORD} & set(_types(run.OptimizeSettings))


USER_CODE = """
    import ultrastyle
    from ultrastyle.optimization.batch import optimize_batch

    with ultrastyle.load("cd-wct-16x", alpha=0.5, max_memory="1GB") as s:
        s.stylize("a.jpg", "b.jpg", levels=(5, 4), format="jpg")
        s.stylize_batch(["a.jpg"], ["b.jpg"], "out", shard="1/2", skip_existing=True)
        s.stylize("a.jpg", "b.jpg", alpah=0.3)  # line 8
        s.stylize("a.jpg", "b.jpg", depth="16")  # line 9
        s.stylize("a.jpg", "b.jpg", shard="1/2")  # line 10
    ultrastyle.stylize("a.jpg", "b.jpg", device="cpu", threads=2, tile=512)
    ultrastyle.stylize_batch(["a.jpg"], ["b.jpg"], backend="torch", shard=(1, 2))
    optimize_batch(["a.jpg"], "b.jpg", "out", iterations=10, scales="512,full")
    optimize_batch(["a.jpg"], "b.jpg", "out", iteration=10)  # line 14
"""


def test_a_type_checker_flags_a_settings_typo_type_and_misplaced_batch_setting(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed here (the dev extra installs it)")
    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent(USER_CODE), encoding="utf-8")
    env = {**os.environ, "MYPYPATH": str(Path(api.__file__).parents[1])}  # the package as checked out (an editable install hides it)
    done = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", "--no-error-summary",
                           "--cache-dir", str(tmp_path / "cache"), str(user)], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    found = {int(line.split(":")[1]): line for line in done.stdout.splitlines() if ": error: " in line}
    assert sorted(found) == [8, 9, 10, 14], done.stdout + done.stderr  # the right calls pass
    for line, said in ((8, '"alpah"'), (9, '"depth"'), (10, '"shard"'), (14, '"iteration"')):
        assert said in found[line] and ("[call-arg]" if line != 9 else "[arg-type]") in found[line], found[line]
