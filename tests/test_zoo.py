"""Model zoo: registry, downloads through a local HTTP server, offline import, CLI."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.models import zoo

NAME = "cd-wct-16x"


# ---------------------------------------------------------------- HTTP mirror


@dataclass
class Mirror:
    """A local web server over shared/models, with per-file faults."""

    url: str
    # file name -> "corrupt" | "drop" | "404" | "stall"
    faults: dict[str, str] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(http.server.SimpleHTTPRequestHandler):
    mirror: Mirror

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass

    def do_GET(self) -> None:
        self.mirror.requests.append(self.path)
        fname = self.path.rsplit("/", 1)[-1]
        fault = self.mirror.faults.get(fname)
        if fault is None:
            return super().do_GET()
        if fault == "404":
            return self.send_error(404, "Not Found")
        data = Path(self.translate_path(self.path)).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "corrupt":
            # Same size, a few flipped bytes: only the sha256 can tell.
            buf = bytearray(data)
            for i in range(0, len(buf), max(1, len(buf) // 7)):
                buf[i] ^= 0xFF
            self.wfile.write(bytes(buf))
        elif fault == "drop":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True  # server closes the socket: a short read
        elif fault == "stall":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.mirror.release.wait(10)  # until the test is over; the client times out first
            self.close_connection = True
        else:  # pragma: no cover
            raise AssertionError(fault)


@pytest.fixture
def mirror(shared_dir: Path) -> Iterator[Mirror]:
    m = Mirror(url="")
    handler = type("Handler", (_Handler,), {"mirror": m})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(shared_dir / "models"))
    )
    m.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield m
    finally:
        m.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def _leftovers(d: Path, fname: str) -> list[Path]:
    """The final file and any temp/partial file for `fname` in `d`."""
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.name == fname or p.name.startswith(f".{fname}"))


def _no_partials(d: Path) -> list[Path]:
    return sorted(d.glob(".*partial*")) if d.exists() else []


# ---------------------------------------------------------------- registry


def test_registry_matches_manifest(shared_dir: Path) -> None:
    manifest = json.loads((shared_dir / "models" / "MANIFEST.json").read_text())["files"]
    reg = zoo.entries()
    assert set(reg) >= {"cd-wct-16x", "cd-16x-pruned-base"}
    seen = set()
    for entry in reg.values():
        for f in entry.files:
            key = f"{entry.name}/{f.name}"
            seen.add(key)
            assert key in manifest, key
            assert f.sha256 == manifest[key]["sha256"], key
            assert f.bytes == manifest[key]["bytes"], key
            assert f.url == manifest[key]["url"], key
            assert f.url.startswith("https://"), key
            # The shared folder is a faithful copy: catches a registry/file mix-up too.
            assert (shared_dir / "models" / key).stat().st_size == f.bytes, key
    assert seen == set(manifest)


def test_registry_entries_fields() -> None:
    e = zoo.get_entry("cd-wct-16x")
    assert sorted(f.name for f in e.files) == sorted([f"{k}SE.pth" for k in range(1, 6)] + [f"{k}SD.pth" for k in range(1, 6)])
    assert (e.architecture, e.format) == ("cd16x", "cd")
    assert e.license == "MIT (Copyright (c) 2020 Huan Wang)"
    assert "MingSun-Tse/Collaborative-Distillation" in e.source
    b = zoo.get_entry("cd-16x-pruned-base")
    assert sorted(f.name for f in b.files) == sorted([f"e{k}_base.pth" for k in range(1, 6)] + [f"d{k}_base.pth" for k in range(1, 6)])
    assert (b.architecture, b.format) == ("cd16x", "cd-base")
    with pytest.raises(Exception):
        e.name = "x"  # type: ignore[misc]  # frozen


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(zoo.UnknownModelError) as ei:
        zoo.get_entry("cd-wct-99x")
    msg = str(ei.value)
    assert "cd-wct-99x" in msg and "cd-wct-16x" in msg and "cd-16x-pruned-base" in msg
    assert isinstance(ei.value, zoo.ZooError)
    with pytest.raises(zoo.UnknownModelError):
        zoo.model_dir("../../etc")


def test_home_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ULTRASTYLE_HOME", str(tmp_path / "h"))
    assert zoo.home_dir() == tmp_path / "h"
    assert zoo.model_dir(NAME) == tmp_path / "h" / "models" / NAME
    monkeypatch.delenv("ULTRASTYLE_HOME")
    assert zoo.home_dir() == Path.home() / ".cache" / "ultrastyle"


def test_sha256_file(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    assert zoo.sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# ---------------------------------------------------------------- fetch


def test_fetch_via_mirror_then_skip_and_force(mirror: Mirror) -> None:
    assert not zoo.is_installed(NAME)
    d = zoo.fetch(NAME, mirror=mirror.url + "/", progress=False)
    assert d == zoo.model_dir(NAME)
    assert zoo.is_installed(NAME)
    assert zoo.verify(NAME) == []
    assert sorted(p.name for p in d.iterdir()) == sorted(f.name for f in zoo.get_entry(NAME).files)
    assert sorted(mirror.requests) == sorted(f"/{NAME}/{f.name}" for f in zoo.get_entry(NAME).files)

    mirror.requests.clear()
    zoo.fetch(NAME, mirror=mirror.url, progress=False)
    assert mirror.requests == []  # present and verified: nothing downloaded

    zoo.fetch(NAME, mirror=mirror.url, progress=False, force=True)
    assert len(mirror.requests) == 10
    assert zoo.verify(NAME) == []


def test_fetch_mirror_from_env_and_progress_bar(
    mirror: Mirror, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ULTRASTYLE_MIRROR", mirror.url)
    d = zoo.fetch("cd-16x-pruned-base", progress=True)
    assert zoo.verify("cd-16x-pruned-base") == []
    assert (d / "e1_base.pth").is_file()
    assert capsys.readouterr().out == ""  # the bar goes to stderr only


def test_fetch_replaces_a_corrupt_existing_file(mirror: Mirror) -> None:
    d = zoo.model_dir(NAME)
    d.mkdir(parents=True)
    (d / "3SE.pth").write_bytes(b"garbage")
    zoo.fetch(NAME, mirror=mirror.url, progress=False)
    assert zoo.verify(NAME) == []


def test_fetch_corrupted_file_raises_checksum_and_leaves_nothing(mirror: Mirror) -> None:
    mirror.faults["2SE.pth"] = "corrupt"
    with pytest.raises(zoo.ChecksumError) as ei:
        zoo.fetch(NAME, mirror=mirror.url, progress=False)
    e = zoo.get_entry(NAME)
    expected = next(f.sha256 for f in e.files if f.name == "2SE.pth")
    msg = str(ei.value)
    assert "2SE.pth" in msg and expected in msg
    assert ei.value.expected == expected and ei.value.found != expected and len(ei.value.found) == 64
    d = zoo.model_dir(NAME)
    assert _leftovers(d, "2SE.pth") == []
    assert _no_partials(d) == []
    assert not zoo.is_installed(NAME)
    # The file fetched before the bad one was kept, verified.
    assert zoo.sha256_file(d / "1SE.pth") == e.files[0].sha256


def test_fetch_dropped_connection_raises_and_leaves_nothing(mirror: Mirror) -> None:
    mirror.faults["4SD.pth"] = "drop"
    with pytest.raises(zoo.DownloadError) as ei:
        zoo.fetch(NAME, mirror=mirror.url, progress=False)
    assert "4SD.pth" in str(ei.value)  # the URL is named
    assert "ultrastyle models import" in str(ei.value)
    d = zoo.model_dir(NAME)
    assert _leftovers(d, "4SD.pth") == []
    assert _no_partials(d) == []
    assert not zoo.is_installed(NAME)


def test_fetch_timeout_raises_and_leaves_nothing(mirror: Mirror) -> None:
    mirror.faults["1SE.pth"] = "stall"
    with pytest.raises(zoo.DownloadError) as ei:
        zoo.fetch(NAME, mirror=mirror.url, progress=False, timeout=0.5)
    assert "timed out" in str(ei.value)
    d = zoo.model_dir(NAME)
    assert _leftovers(d, "1SE.pth") == [] and _no_partials(d) == []


def test_fetch_http_404_raises(mirror: Mirror) -> None:
    mirror.faults["5SE.pth"] = "404"
    # A corrupt leftover must not survive a failed re-download looking installed.
    zoo.model_dir(NAME).mkdir(parents=True)
    (zoo.model_dir(NAME) / "5SE.pth").write_bytes(b"\0" * next(f.bytes for f in zoo.get_entry(NAME).files if f.name == "5SE.pth"))
    with pytest.raises(zoo.DownloadError) as ei:
        zoo.fetch(NAME, mirror=mirror.url, progress=False)
    assert "404" in str(ei.value) and "5SE.pth" in str(ei.value)
    assert _leftovers(zoo.model_dir(NAME), "5SE.pth") == []
    assert _no_partials(zoo.model_dir(NAME)) == []


def test_fetch_unreachable_mirror_has_offline_hint(closed_port_url: str) -> None:
    with pytest.raises(zoo.DownloadError) as ei:
        zoo.fetch(NAME, mirror=closed_port_url, progress=False, timeout=5)
    msg = str(ei.value)
    assert closed_port_url in msg
    assert f"ultrastyle models import {NAME}" in msg
    assert _no_partials(zoo.model_dir(NAME)) == []
    assert not any(zoo.model_dir(NAME).iterdir())


def test_fetch_rejects_non_http_mirror(shared_dir: Path) -> None:
    with pytest.raises(zoo.DownloadError, match="models import"):
        zoo.fetch(NAME, mirror=str(shared_dir / "models"), progress=False)


def test_ensure_uses_installed_copy_without_network(shared_dir: Path, closed_port_url: str, mirror: Mirror) -> None:
    # Not installed: ensure downloads (from the env mirror here).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ULTRASTYLE_MIRROR", mirror.url)
        d = zoo.ensure(NAME, progress=False)
    assert zoo.verify(NAME) == []
    # Installed: ensure returns at once, even with a dead mirror.
    assert zoo.ensure(NAME, mirror=closed_port_url, progress=False) == d


# ---------------------------------------------------------------- import


def test_import_local_from_shared(shared_dir: Path) -> None:
    # Flat folder of files.
    d = zoo.import_local(NAME, shared_dir / "models" / NAME)
    assert d == zoo.model_dir(NAME) and zoo.is_installed(NAME) and zoo.verify(NAME) == []
    # A mirror-style root with NAME/ sub-folders works too.
    d2 = zoo.import_local("cd-16x-pruned-base", shared_dir / "models")
    assert zoo.verify("cd-16x-pruned-base") == [] and (d2 / "d5_base.pth").is_file()
    assert _no_partials(d) == [] and _no_partials(d2) == []


def test_import_local_refuses_tampered_copy(shared_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "copy"
    shutil.copytree(shared_dir / "models" / NAME, src)
    victim = src / "3SD.pth"
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    victim.write_bytes(bytes(data))
    with pytest.raises(zoo.ChecksumError) as ei:
        zoo.import_local(NAME, src)
    expected = next(f.sha256 for f in zoo.get_entry(NAME).files if f.name == "3SD.pth")
    msg = str(ei.value)
    assert "3SD.pth" in msg and expected in msg and zoo.sha256_file(victim) in msg
    d = zoo.model_dir(NAME)
    assert _leftovers(d, "3SD.pth") == [] and _no_partials(d) == []
    assert not zoo.is_installed(NAME)


def test_import_local_missing_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "1SE.pth").write_bytes(b"x")
    with pytest.raises(zoo.ZooError, match=r"lacks 9 of the 10 files.*5SD\.pth"):
        zoo.import_local(NAME, tmp_path)
    with pytest.raises(zoo.ZooError, match="not a directory"):
        zoo.import_local(NAME, tmp_path / "nope")


def test_verify_detects_modification_after_install(shared_dir: Path) -> None:
    d = zoo.import_local(NAME, shared_dir / "models" / NAME)
    assert zoo.verify(NAME) == []
    # Same size, different content: is_installed (sizes only) misses it, verify must not.
    p = d / "4SE.pth"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    (d / "1SD.pth").unlink()
    (d / "2SD.pth").write_bytes(b"short")
    problems = zoo.verify(NAME)
    assert len(problems) == 3
    assert any("4SE.pth" in s and "sha256" in s for s in problems)
    assert any("1SD.pth" in s and "missing" in s for s in problems)
    assert any("2SD.pth" in s and "size" in s for s in problems)
    # import repairs it (and only the broken files need rewriting).
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    assert zoo.verify(NAME) == []


# ---------------------------------------------------------------- CLI


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_list(runner: CliRunner, shared_dir: Path) -> None:
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0, r.output
    assert "cd-wct-16x" in r.stdout and "cd-16x-pruned-base" in r.stdout
    assert "yes" not in r.stdout  # nothing installed yet
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0 and "yes" in r.stdout and "9.7 MB" in r.stdout


def test_cli_import_verify_path(runner: CliRunner, shared_dir: Path) -> None:
    r = runner.invoke(app, ["models", "path", NAME])
    assert r.exit_code == 1
    assert "not installed" in r.stderr and f"ultrastyle models import {NAME}" in r.stderr

    r = runner.invoke(app, ["models", "verify"])
    assert r.exit_code == 0 and "no models installed" in r.stdout

    r = runner.invoke(app, ["models", "import", NAME, str(shared_dir / "models" / NAME)])
    assert r.exit_code == 0, r.output
    assert zoo.verify(NAME) == []

    r = runner.invoke(app, ["models", "verify", NAME])
    assert r.exit_code == 0 and f"ok: {NAME}" in r.stdout

    r = runner.invoke(app, ["models", "path", NAME])
    assert r.exit_code == 0 and r.stdout.strip() == str(zoo.model_dir(NAME))

    (zoo.model_dir(NAME) / "5SE.pth").unlink()
    (zoo.model_dir(NAME) / "1SE.pth").write_bytes(b"x")
    r = runner.invoke(app, ["models", "verify"])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and all(s.startswith("error: ") for s in lines)
    assert "5SE.pth" in r.stderr and "1SE.pth" in r.stderr


def test_cli_fetch(runner: CliRunner, mirror: Mirror) -> None:
    r = runner.invoke(app, ["models", "fetch", NAME, "--mirror", mirror.url, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(zoo.model_dir(NAME))
    assert zoo.verify(NAME) == []


def test_cli_errors_are_one_red_line(runner: CliRunner, closed_port_url: str, tmp_path: Path) -> None:
    for args in (
        ["models", "path", "nope"],
        ["models", "verify", "nope"],
        ["models", "fetch", "nope"],
        ["models", "import", "nope", str(tmp_path)],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, args
        assert r.exception is None or isinstance(r.exception, SystemExit), args
        assert r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert "cd-wct-16x" in r.stderr  # the known names are listed
        assert "Traceback" not in r.output

    r = runner.invoke(app, ["models", "fetch", NAME, "--mirror", closed_port_url, "--no-progress"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and f"ultrastyle models import {NAME} DIR" in r.stderr


def test_cli_help_texts(runner: CliRunner) -> None:
    for cmd in ("list", "fetch", "import", "verify", "path"):
        r = runner.invoke(app, ["models", cmd, "--help"])
        assert r.exit_code == 0, cmd
        assert len(r.stdout.strip().splitlines()) > 3, cmd
    r = runner.invoke(app, ["models", "fetch", "--help"])
    assert "--mirror" in r.stdout and "--force" in r.stdout
