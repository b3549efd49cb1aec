"""Shared fixtures: the read-only ../shared folder, devices and dtypes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ULTRASTYLE_SHARED", REPO.parent / "shared"))
# The CLI tunes glibc's malloc for the whole process (`memory.keep_freed_memory`): freed memory
# stays in the heap until trimmed. Tile plans no longer depend on it (a runner reads the heap
# factor once, when it is made), but the resident-set measurements of later tests would (the
# ONNX Runtime arena tests in tests/test_backends.py), so the commands run in this one test
# process leave malloc alone (tests/test_memory_planner.py tests the tuning in subprocesses).
os.environ["ULTRASTYLE_MALLOC"] = "system"


def pytest_sessionstart(session: pytest.Session) -> None:
    # In CI the real models are part of the contract: a missing ../shared is a
    # failure, never a silent skip.
    if os.environ.get("CI") and not (SHARED / "models" / "MANIFEST.json").is_file():
        raise pytest.UsageError(f"CI=true but the shared folder is missing: {SHARED}/models/MANIFEST.json")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "models" / "MANIFEST.json").is_file():
        pytest.skip(f"needs the shared models and images at {SHARED} (set ULTRASTYLE_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def cd16x_dir(shared_dir: Path) -> Path:
    return shared_dir / "models" / "cd-wct-16x"


@pytest.fixture(scope="session")
def photo(shared_dir: Path) -> torch.Tensor:
    """A CD content photo, long side 320 px: (3, H, W) in [0, 1]."""
    from ultrastyle.io.images import load_image, resize_long_side

    return resize_long_side(load_image(shared_dir / "images/content/cd_content_in4.jpg"), 320)


@pytest.fixture(scope="session")
def style(shared_dir: Path) -> torch.Tensor:
    """A CD style painting, long side 128 px: (3, H, W) in [0, 1]."""
    from ultrastyle.io.images import load_image, resize_long_side

    return resize_long_side(load_image(shared_dir / "images/style/cd_style_in2.jpg"), 128)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Never touch the user's real model cache from a test.
    home = tmp_path_factory.mktemp("ultrastyle_home")
    monkeypatch.setenv("ULTRASTYLE_HOME", str(home))
    return home


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return torch.device(request.param)


@pytest.fixture
def one_thread():
    # Tiny tensors: OpenMP threads only add spin-waiting, badly so when other
    # processes share the cores (10x slower measured on a loaded 2-core machine).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def closed_port_url() -> str:
    # Bind then close: nothing listens there, so connecting is refused at once.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
