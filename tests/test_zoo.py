"""Model zoo: registry, downloads through a local HTTP server, offline import, CLI."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ultrastyle.cli.main import app
from ultrastyle.cli.remedies import as_command
from ultrastyle.io import atomic
from ultrastyle.models import registry as zoo_registry
from ultrastyle.models import zoo
from ultrastyle.models.pretrained import load_model

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
            if f.url is None:  # this project's own (packaged) or another model's file: not in the upstream manifest
                continue
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


def test_packaged_and_derived_registry_files_match_their_sources() -> None:
    # Every packaged file ships with the package at its pinned size and sha256;
    # every derived file pins the same bytes as the file it is taken from.
    for entry in zoo.entries().values():
        for f in entry.files:
            if f.package is not None:
                path = zoo.weights_dir() / f.package
                assert path.stat().st_size == f.bytes and zoo.sha256_file(path) == f.sha256, path
            elif f.url is None:
                src = next(g for g in zoo.get_entry(f.source_model).files if g.name == f.source_file)
                assert (src.sha256, src.bytes) == (f.sha256, f.bytes), f"{entry.name}/{f.name}"


def test_registry_entries_fields() -> None:
    e = zoo.get_entry("cd-wct-16x")
    assert sorted(f.name for f in e.files) == sorted([f"{k}SE.pth" for k in range(1, 6)] + [f"{k}SD.pth" for k in range(1, 6)])
    assert (e.architecture, e.format) == ("cd16x", "cd")
    assert e.license == "MIT (Copyright (c) 2020 Huan Wang)"
    assert "MingSun-Tse/Collaborative-Distillation" in e.source
    b = zoo.get_entry("cd-16x-pruned-base")
    assert sorted(f.name for f in b.files) == sorted([f"e{k}_base.pth" for k in range(1, 6)] + [f"d{k}_base.pth" for k in range(1, 6)])
    assert (b.architecture, b.format) == ("cd16x", "cd-base")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.name = "x"  # type: ignore[misc]


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(zoo.UnknownModelError) as ei:
        zoo.get_entry("cd-wct-99x")
    msg = str(ei.value)
    assert "cd-wct-99x" in msg and "cd-wct-16x" in msg and "cd-16x-pruned-base" in msg
    assert isinstance(ei.value, zoo.ZooError)
    with pytest.raises(zoo.UnknownModelError, match="unknown model 'cd-wct16x'; did you mean 'cd-wct-16x'\\? known models"):
        zoo.get_entry("cd-wct16x")  # a typo, as option typos get
    with pytest.raises(zoo.UnknownModelError, match="unknown model 'CD-WCT-16X'; did you mean 'cd-wct-16x'\\?"):
        zoo.get_entry("CD-WCT-16X")  # names are lower case
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
    said = capsys.readouterr()
    assert said.out == ""  # the bar goes to stderr only
    # Not a terminal here (a log, a service's pipe): one plain line per file, not the bar's states.
    assert said.err.count("downloading ") == said.err.count("\n") >= 1 and "e1_base.pth" in said.err, said.err


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
    assert f"ultrastyle.import_model({NAME!r}, DIR)" in str(ei.value)  # the offline fix, as Python
    assert f"ultrastyle models import {NAME} DIR" in as_command(ei.value)  # and as the CLI prints it
    d = zoo.model_dir(NAME)
    assert _leftovers(d, "4SD.pth") == []
    assert _no_partials(d) == []
    assert not zoo.is_installed(NAME)


def test_fetch_timeout_raises_and_leaves_nothing(mirror: Mirror) -> None:
    mirror.faults["1SE.pth"] = "stall"
    with pytest.raises(zoo.DownloadError) as ei:
        zoo.fetch(NAME, mirror=mirror.url, progress=False, timeout=0.5)
    size = next(f.bytes for f in zoo.get_entry(NAME).files if f.name == "1SE.pth")
    assert f"timed out after 0.5 s (received {size // 2} of {size} bytes)" in str(ei.value)  # what arrived is counted
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
    assert f"ultrastyle models import {NAME} DIR" in as_command(ei.value)
    assert re.search(r"copy its 10 file\(s\) \(\w+\.pth, \w+\.pth, \w+\.pth, ...\) from one that has it into a folder DIR here", msg)
    assert _no_partials(zoo.model_dir(NAME)) == []
    assert not zoo.model_dir(NAME).exists()  # the folder made for the install is gone with it


def test_fetch_rejects_non_http_mirror(shared_dir: Path, runner: CliRunner) -> None:
    with pytest.raises(zoo.ZooError, match=rf"expected an http:// or https:// base URL.*ultrastyle\.import_model\('{NAME}', '{shared_dir}/models'\)"):
        zoo.fetch(NAME, mirror=str(shared_dir / "models"), progress=False)
    assert not zoo.model_dir(NAME).exists()  # refused before any folder is made
    r = runner.invoke(app, ["models", "fetch", NAME, "--mirror", "notaurl"])
    text = " ".join(r.output.replace("│", " ").split())
    # not a folder either: the fix names a folder to fill, not the bad value (which `import` refused in turn)
    assert r.exit_code == 2 and "Invalid value for --mirror" in text and f"ultrastyle models import {NAME} DIR" in text, r.output


def test_a_local_folder_as_ultrastyle_mirror_is_named_and_does_not_block_what_downloads_nothing(
    shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ULTRASTYLE_MIRROR", str(shared_dir / "models"))
    with pytest.raises(zoo.ZooError, match=rf"ULTRASTYLE_MIRROR .*ultrastyle\.import_model\('{NAME}', '{shared_dir / 'models'}'\)"):
        zoo.fetch(NAME, progress=False)
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    assert zoo.fetch(NAME, progress=False) == zoo.model_dir(NAME)  # installed: nothing to download, the mirror is not used


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


# ---------------------------------------------------------------- interrupted installs


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_fetch_killed_mid_download_leaves_nothing_after_the_next_fetch(mirror: Mirror) -> None:
    # `ultrastyle models fetch` in its own process, stalled half-way through 3SD.pth, then kill -9.
    mirror.faults["3SD.pth"] = "stall"
    d = zoo.model_dir(NAME)
    p = subprocess.Popen(
        [sys.executable, "-m", "ultrastyle.cli.main", "models", "fetch", NAME, "--mirror", mirror.url, "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (partials := [q for q in _no_partials(d) if q.name.startswith(".3SD.pth.")]):
            assert p.poll() is None and time.monotonic() < deadline, "the fetch never reached 3SD.pth"
            time.sleep(0.05)
    finally:
        p.kill()  # SIGKILL: no except/finally of the fetch runs
        p.wait()
    assert len(partials) == 1 and partials[0].exists()
    assert atomic.writer_pid(partials[0]) == p.pid
    assert not (d / "3SD.pth").exists()
    mirror.faults.clear()
    zoo.fetch(NAME, mirror=mirror.url, progress=False)
    assert _no_partials(d) == [] and zoo.verify(NAME) == []
    assert sorted(q.name for q in d.iterdir()) == sorted(f.name for f in zoo.get_entry(NAME).files)


def test_import_sweeps_partials_of_dead_writers_only(shared_dir: Path) -> None:
    d = zoo.model_dir(NAME)
    d.mkdir(parents=True)
    dead = d / f".2SE.pth.{_dead_pid()}.0123abcd{atomic.PARTIAL_SUFFIX}"
    live = d / f".2SE.pth.{os.getpid()}.0123abcd{atomic.PARTIAL_SUFFIX}"  # a concurrent import in this process
    legacy_old = d / ".1SE.pth.partial-ab12cd34"  # older ultrastyle's names: by age
    legacy_new = d / ".1SE.pth.partial-ef56ab78"
    foreign = d / ".1SE.pth.swp"
    for q in (dead, live, legacy_old, legacy_new, foreign):
        q.write_bytes(b"x" * 100)
    os.utime(legacy_old, (time.time() - 2 * 3600,) * 2)
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    left = {q.name for q in d.iterdir()} - {f.name for f in zoo.get_entry(NAME).files}
    assert left == {live.name, legacy_new.name, foreign.name}
    assert zoo.verify(NAME) == []


# ---------------------------------------------------------------- damaged installed files


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_ensure_refuses_a_tampered_installed_file_then_repair_works(shared_dir: Path, closed_port_url: str) -> None:
    d = zoo.import_local(NAME, shared_dir / "models" / NAME)
    victim = d / "4SE.pth"
    _flip_one_byte(victim)
    assert zoo.is_installed(NAME)  # same size: the cheap check cannot tell
    with pytest.raises(zoo.DamagedModelError) as ei:
        zoo.ensure(NAME, mirror=closed_port_url, progress=False)
    err = ei.value
    assert isinstance(err, zoo.ZooError)
    expected = next(f.sha256 for f in zoo.get_entry(NAME).files if f.name == "4SE.pth")
    msg = str(err)
    assert str(victim) in msg and expected in msg and zoo.sha256_file(victim) in msg
    assert f"ultrastyle.fetch_model({NAME!r})" in msg and f"ultrastyle.import_model({NAME!r}, DIR)" in msg
    assert f"ultrastyle models fetch {NAME}  (offline: ultrastyle models import {NAME} DIR)" in as_command(err)
    assert [x[0] for x in err.damaged] == ["4SE.pth"]
    with pytest.raises(zoo.DamagedModelError):  # load_model goes through ensure: refused before any weight is read
        load_model(NAME, progress=False)
    (d / "1SD.pth").unlink()  # and another file missing: still refused naming the damage, not fetched over it
    with pytest.raises(zoo.DamagedModelError) as ei:
        zoo.ensure(NAME, mirror=closed_port_url, progress=False)
    assert "4SE.pth" in [x[0] for x in ei.value.damaged] and victim.is_file()  # nothing deleted
    # The repair the message names: re-import (fetch works the same way, from the network).
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    assert zoo.ensure(NAME, mirror=closed_port_url, progress=False) == d


def test_fetch_deletes_nothing_before_its_mirror_is_known_to_be_usable_and_names_a_folder_in_the_way(shared_dir: Path) -> None:
    d = zoo.import_local(NAME, shared_dir / "models" / NAME)
    victim = d / "5SD.pth"
    victim.write_bytes(victim.read_bytes()[:7])
    with pytest.raises(zoo.ZooError):
        zoo.fetch(NAME, mirror=str(shared_dir / "models"), progress=False)  # a folder is imported, not fetched
    assert victim.stat().st_size == 7  # still there to be named, not deleted before the refusal
    victim.unlink()
    victim.mkdir()
    with pytest.raises(zoo.ZooError, match=r"5SD.pth: a folder where a model file goes"):
        zoo.import_local(NAME, shared_dir / "models" / NAME)


def test_ensure_refuses_a_tampered_packaged_file(registry: TempRegistry, no_network: None) -> None:
    files = [registry.package("own/4SE.pth", _blob(1)), registry.package("own/4SD.pth", _blob(2))]
    registry.write({"own": entry_json(files, stages=[4])})
    d = zoo.fetch("own", progress=False)
    _flip_one_byte(d / "4SE.pth")
    with pytest.raises(zoo.DamagedModelError) as ei:
        zoo.ensure("own", progress=False)
    msg = str(ei.value)
    assert "4SE.pth" in msg and "ultrastyle models fetch own" in as_command(ei.value) and "import_local" not in msg


def test_stylize_refuses_a_tampered_zoo_model(runner: CliRunner, shared_dir: Path, tmp_path: Path) -> None:
    d = zoo.import_local(NAME, shared_dir / "models" / NAME)
    _flip_one_byte(d / "2SD.pth")
    content = tmp_path / "c.png"
    Image.new("RGB", (32, 24), (120, 80, 40)).save(content)
    out = tmp_path / "out"
    r = runner.invoke(app, ["stylize", str(content), "--style", str(content), "-o", str(out), "--model", NAME])
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    assert str(d / "2SD.pth") in r.stderr and f"ultrastyle models fetch {NAME}" in r.stderr, r.stderr
    assert not (zoo.home_dir() / "bundles").exists() or not any((zoo.home_dir() / "bundles").iterdir())
    assert not out.exists() or not any(out.iterdir())


def test_installed_files_are_hashed_once_per_process(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ultrastyle.runtime.backends.select import weights_digest

    zoo.import_local(NAME, shared_dir / "models" / NAME)
    from ultrastyle.io import digest

    hashed: list[str] = []
    real = digest.sha256_file
    monkeypatch.setattr(digest, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    zoo.ensure(NAME, progress=False)
    assert hashed == []  # just installed: digested while copied
    monkeypatch.setattr(digest, "_DIGESTS", {})  # as in a later process
    zoo.ensure(NAME, progress=False)
    _, digests = weights_digest(NAME)
    zoo.ensure(NAME, progress=False)
    assert sorted(hashed) == sorted(f.name for f in zoo.get_entry(NAME).files)  # each file once
    assert digests and all(digests[f.name] == f.sha256 for f in zoo.get_entry(NAME).files if f.name in digests)


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
    assert zoo.install_status(NAME) == "installed"


@pytest.mark.parametrize(("damage", "status"), [("flip", "damaged"), ("remove", "incomplete")])
def test_cli_list_and_path_tell_a_damaged_model_from_an_installed_one(runner: CliRunner, shared_dir: Path, damage: str,
                                                                      status: str) -> None:  # fmt: skip
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    f = zoo.model_dir(NAME) / "4SD.pth"
    _flip_one_byte(f) if damage == "flip" else f.unlink()  # same size: only the sha256 tells; or an interrupted install
    assert zoo.install_status(NAME) == status
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0 and status in r.stdout and "yes" not in r.stdout, r.output
    assert f"{NAME}: damaged or half installed; see: ultrastyle models verify" in " ".join(r.stdout.split())
    r = runner.invoke(app, ["models", "path", NAME])
    assert r.exit_code == 1 and f"is {status}" in r.stderr and f"ultrastyle models verify {NAME}" in r.stderr, r.output


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
    assert len(lines) == 3 and all(s.startswith("error: ") for s in lines[:2])
    assert "5SE.pth" in r.stderr and "1SE.pth" in r.stderr
    assert lines[2] == f"repair {NAME} with: ultrastyle models fetch {NAME}  (offline: ultrastyle models import {NAME} DIR)"


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
        assert r.exit_code == 2, args  # an unknown name is a bad argument, refused as other commands refuse one
        assert r.exception is None or isinstance(r.exception, SystemExit), args
        assert r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert "cd-wct-16x" in r.stderr  # the known names are listed
        assert "Traceback" not in r.output
    r = runner.invoke(app, ["models", "import", NAME, str(tmp_path / "nope")])  # a source that is no folder: a bad argument too
    assert r.exit_code == 2 and r.stderr == f"error: {tmp_path / 'nope'} is not a directory; pass the folder that holds {NAME}'s files\n"

    r = runner.invoke(app, ["models", "fetch", NAME, "--mirror", closed_port_url, "--no-progress"])
    assert r.exit_code == 1
    assert r.stderr.count("\n") == 1 and f"ultrastyle models import {NAME} DIR" in r.stderr
    # The mirror given is the suspect: what it must serve, and the offline fix as a command.
    assert f"must serve each file at MIRROR/NAME/FILE: check that it holds {NAME}/1SE.pth" in r.stderr, r.stderr
    assert "ultrastyle.models.zoo" not in r.stderr


def test_cli_help_texts(runner: CliRunner) -> None:
    for cmd in ("list", "fetch", "import", "verify", "path"):
        r = runner.invoke(app, ["models", cmd, "--help"])
        assert r.exit_code == 0, cmd
        assert len(r.stdout.strip().splitlines()) > 3, cmd
    r = runner.invoke(app, ["models", "fetch", "--help"])
    assert "--mirror" in r.stdout and "--force" in r.stdout


# ---------------------------------------------------------------- file sources: package / from

REAL_REGISTRY = Path(zoo.__file__).with_name("zoo.json")


def real_entry(name: str) -> dict:
    """An entry of the shipped zoo.json, as JSON."""
    return json.loads(REAL_REGISTRY.read_text())["models"][name]


def entry_json(files: list[dict], **extra: object) -> dict:
    return {"description": "test model", "license": "MIT", "source": "tests", "architecture": "cd16x",
            "format": "cd", "files": files, **extra}  # fmt: skip


@dataclass
class TempRegistry:
    """A zoo.json and a package weights folder of the test's own (the registry and zoo modules point at them)."""

    path: Path
    weights: Path

    def write(self, models: dict[str, dict]) -> None:
        self.path.write_text(json.dumps({"schema": 1, "models": models}))
        zoo_registry._load_registry.cache_clear()

    def package(self, rel: str, data: bytes) -> dict:
        """Ship ``data`` as weights/REL; the file's registry JSON."""
        p = self.weights / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        return {"name": Path(rel).name, "package": rel, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TempRegistry]:
    reg = TempRegistry(tmp_path / "registry" / "zoo.json", tmp_path / "registry" / "weights")
    reg.weights.mkdir(parents=True)
    monkeypatch.setattr(zoo_registry, "_REGISTRY", reg.path)  # read by the registry
    monkeypatch.setattr(zoo, "_WEIGHTS", reg.weights)  # read by the installer
    zoo_registry._load_registry.cache_clear()
    yield reg
    zoo_registry._load_registry.cache_clear()  # monkeypatch restores the real paths after this


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("network access")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def _blob(seed: int, n: int = 5000) -> bytes:
    return random.Random(seed).randbytes(n)


def test_packaged_files_install_and_verify_without_network(registry: TempRegistry, no_network: None) -> None:
    files = [registry.package("own/4SE.pth", _blob(1)), registry.package("own/4SD.pth", _blob(2))]
    registry.write({"own": entry_json(files, stages=[4])})
    e = zoo.get_entry("own")
    assert [f.kind for f in e.files] == ["package", "package"] and e.source_kinds == ("package",)
    assert e.stages == (4,) and e.files[0].url is None
    assert not zoo.is_installed("own")
    d = zoo.ensure("own", progress=False)
    assert zoo.verify("own") == [] and _no_partials(d) == []
    assert (d / "4SE.pth").read_bytes() == _blob(1) and (d / "4SD.pth").read_bytes() == _blob(2)
    # import needs no folder for such a model: it re-installs what is missing from the package.
    (d / "4SD.pth").unlink()
    assert zoo.import_local("own", None) == d and zoo.verify("own") == []
    # fetch --force copies again, verified.
    (registry.weights / "own" / "4SE.pth").unlink()
    with pytest.raises(zoo.ZooError, match=r"own/4SE\.pth ships inside the ultrastyle package .* reinstall ultrastyle"):
        zoo.fetch("own", force=True, progress=False)
    assert zoo.verify("own") == []  # the installed copy was kept


def test_tampered_packaged_file_is_refused(registry: TempRegistry, no_network: None) -> None:
    files = [registry.package("own/4SE.pth", _blob(1)), registry.package("own/4SD.pth", _blob(2))]
    registry.write({"own": entry_json(files, stages=[4])})
    victim = registry.weights / "own" / "4SD.pth"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0x01  # same size, one bit
    victim.write_bytes(bytes(data))
    with pytest.raises(zoo.ChecksumError) as ei:
        zoo.ensure("own", progress=False)
    msg = str(ei.value)
    assert "own/4SD.pth" in msg and files[1]["sha256"] in msg and zoo.sha256_file(victim) in msg
    assert "packaged file" in msg and "reinstall" in msg
    d = zoo.model_dir("own")
    assert _leftovers(d, "4SD.pth") == [] and _no_partials(d) == []
    assert not zoo.is_installed("own")


def test_an_earlier_releases_packaged_file_is_replaced_not_refused(registry: TempRegistry, no_network: None, runner: CliRunner) -> None:
    """A new release ships new weights: the copy an older one installed is outdated, and ensure replaces it."""
    old = [registry.package("own/4SE.pth", _blob(1)), registry.package("own/4SD.pth", _blob(2))]
    registry.write({"own": entry_json(old, stages=[4])})
    d = zoo.fetch("own", progress=False)
    new_se = registry.package("own/4SE.pth", _blob(3))  # same size, other bytes: the upgrade
    registry.write({"own": entry_json([{**new_se, "earlier_sha256": [old[0]["sha256"]]}, old[1]], stages=[4])})
    assert zoo.is_installed("own") and zoo.is_outdated("own") and zoo.install_status("own") == "outdated"
    _flip_one_byte(d / "4SD.pth")  # outdated and damaged: damaged, as ensure refuses it (it once said outdated)
    assert zoo.install_status("own") == "damaged"
    (d / "4SD.pth").write_bytes(_blob(2))
    problems = zoo.verify("own")
    assert len(problems) == 1 and "earlier ultrastyle release" in problems[0] and "ultrastyle models" not in problems[0]  # no command in the library
    r = runner.invoke(app, ["models", "verify", "own"])
    assert r.exit_code == 1 and "earlier ultrastyle release" in r.stderr
    assert "repair own with: ultrastyle models fetch own" in r.stderr and "models import" not in r.stderr, r.stderr  # packaged: nothing to import
    assert zoo.ensure("own", progress=False) == d
    assert zoo.sha256_file(d / "4SE.pth") == new_se["sha256"] and not zoo.is_outdated("own") and zoo.verify("own") == []
    # A digest the registry does not list as earlier is still damage, refused.
    _flip_one_byte(d / "4SE.pth")
    assert not zoo.is_outdated("own")
    with pytest.raises(zoo.DamagedModelError):
        zoo.ensure("own", progress=False)


def test_the_packaged_models_list_their_earlier_versions() -> None:
    """Every earlier digest of a packaged file in this repository's history is listed (so upgrades replace, not refuse)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    try:
        shallow = git("rev-parse", "--is-shallow-repository").strip() == "true"
        log = git("log", "--format=%H", "--", "ultrastyle/models/zoo.json").split()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout with its history here, so there is none to compare with ({exc})")
    if shallow and len(log) < 2:
        pytest.skip("a shallow clone: zoo.json's earlier versions are not in this checkout's history")
    current = {(n, f.name): f for n, e in zoo.entries().items() for f in e.files if f.kind == "package"}
    assert current, "zoo.json lists no packaged file"
    missing, compared, unreadable = [], [], []
    for commit in log:  # the latest commit too: the working copy may have changed since
        try:
            models = json.loads(git("show", f"{commit}:ultrastyle/models/zoo.json"))["models"]
            files = [(n, f.get("name"), f.get("sha256")) for n, e in models.items() for f in e.get("files", [])]
        except (subprocess.CalledProcessError, ValueError, KeyError, TypeError, AttributeError):
            unreadable.append(commit[:7])  # an older schema, or the commit that removed the file
            continue
        compared.append(commit)
        for n, name, sha in files:
            now = current.get((n, name))
            if now is not None and sha not in (now.sha256, *now.earlier_sha256):
                missing.append(f"{n}/{name} {sha} (zoo.json at {commit[:7]})")
    assert not missing, "add to the file's earlier_sha256: " + "; ".join(sorted(set(missing)))
    if len(log) > 1:  # several versions: at least one earlier one was read, not all skipped as an older schema
        assert set(compared) - {log[0]}, f"no earlier zoo.json could be read (older schema at {', '.join(unreadable)})"


def _own_from_cd(registry: TempRegistry) -> dict:
    """cd-wct-16x (URL files) and `own`: 4SE.pth reused from it, 4SD.pth packaged, stage 4 only."""
    cd = real_entry(NAME)
    se = next(f for f in cd["files"] if f["name"] == "4SE.pth")
    own = entry_json(
        [{"name": "4SE.pth", "from": f"{NAME}/4SE.pth", "sha256": se["sha256"], "bytes": se["bytes"]},
         registry.package("own/4SD.pth", _blob(3))],
        stages=[4], defaults={"method": "adain", "levels": [4], "alpha": 1.0},
    )  # fmt: skip
    registry.write({NAME: cd, "own": own})
    return se


def test_derived_file_installs_after_its_source_model(registry: TempRegistry, mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    se = _own_from_cd(registry)
    assert zoo.get_entry("own").depends_on == (NAME,)
    assert zoo.get_entry("own").source_kinds == ("package", "from")
    monkeypatch.setenv("ULTRASTYLE_MIRROR", mirror.url)
    d = zoo.ensure("own", progress=False)
    # The source model was installed first, whole and verified, from the mirror.
    assert sorted(mirror.requests) == sorted(f"/{NAME}/{f.name}" for f in zoo.get_entry(NAME).files)
    assert zoo.verify(NAME) == [] and zoo.verify("own") == []
    assert zoo.sha256_file(d / "4SE.pth") == se["sha256"]
    assert (d / "4SE.pth").read_bytes() == (zoo.model_dir(NAME) / "4SE.pth").read_bytes()
    mirror.requests.clear()
    assert zoo.ensure("own", progress=False) == d and mirror.requests == []

    # A damaged source is caught by the copy's own sha256 check (ensure("own") checks own's files only).
    src = zoo.model_dir(NAME) / "4SE.pth"
    data = bytearray(src.read_bytes())
    data[99] ^= 0xFF
    src.write_bytes(bytes(data))
    with pytest.raises(zoo.ChecksumError) as ei:
        zoo.fetch("own", force=True, progress=False)
    # The repair of the source: a plain fetch replaces a damaged file (no force: that downloads every file), or offline an import.
    said = f"reinstall it: ultrastyle.fetch_model('{NAME}')  (offline: ultrastyle.import_model('{NAME}', DIR))"
    assert said in str(ei.value) and se["sha256"] in str(ei.value)
    from ultrastyle.cli.remedies import as_command

    assert f"reinstall it: ultrastyle models fetch {NAME}  (offline: ultrastyle models import {NAME} DIR)" in as_command(ei.value)
    assert zoo.verify("own") == []  # the verified copy was kept
    assert mirror.requests == []  # force applies to `own`, not to the model it reuses


def test_import_installs_derived_files_from_the_source_model(registry: TempRegistry, shared_dir: Path, no_network: None, runner: CliRunner) -> None:
    _own_from_cd(registry)
    # Not installed, no folder: a clear error, nothing downloaded.
    with pytest.raises(zoo.ZooError, match=rf"reuses files of {NAME}, which is not installed.*ultrastyle\.fetch_model\('{NAME}'\)"):
        zoo.import_local("own", None)
    # A mirror-style root holds the source model: it is imported from there first.
    r = runner.invoke(app, ["models", "import", "own", str(shared_dir / "models")])
    assert r.exit_code == 0, r.output
    assert zoo.verify(NAME) == [] and zoo.verify("own") == []
    r = runner.invoke(app, ["models", "list"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith("own "))
    assert "package" in lines[i] and f"from:{NAME}" in lines[i + 1]  # one source per line
    assert " 4 " in lines[i] and "yes" in lines[i]
    assert "url" in next(line for line in lines if line.lstrip().startswith(f"{NAME} "))


@pytest.mark.parametrize(
    "sources, found",
    [({}, "no source"), ({"url": "https://example.com/a.pth", "package": "own/4SE.pth"}, "2 sources (url, package)"),
     ({"package": "own/4SE.pth", "from": f"{NAME}/4SE.pth"}, "2 sources (package, from)")],
)  # fmt: skip
def test_registry_file_needs_exactly_one_source(registry: TempRegistry, sources: dict, found: str) -> None:
    f = {"name": "4SE.pth", "sha256": "0" * 64, "bytes": 1, **sources}
    registry.write({NAME: real_entry(NAME), "own": entry_json([f, registry.package("own/4SD.pth", b"x")], stages=[4])})
    with pytest.raises(zoo.ZooError) as ei:
        zoo.entries()
    msg = str(ei.value)
    assert "model 'own', file '4SE.pth'" in msg and found in msg
    assert 'exactly one of "url", "package" or "from"' in msg and str(registry.path) in msg


@pytest.mark.parametrize(
    "bad, message",
    [({"from": "nope/4SE.pth"}, "must name another registered model"),
     ({"from": f"{NAME}/9SE.pth"}, "cd-wct-16x has no file '9SE.pth'"),
     ({"from": f"{NAME}/4SE.pth", "sha256": "1" * 64}, "a derived file must be byte-identical"),
     ({"from": "own/4SD.pth"}, "must name another registered model"),
     ({"package": "../../etc/passwd"}, "relative path inside ultrastyle/models/weights/"),
     ({"name": "../4SE.pth", "package": "own/x"}, "plain file name"),
     ({"url": "https://example.invalid/4SE.pth", "earlier_sha256": "ab"}, "earlier_sha256 must be a list of sha256 digests"),
     ({"url": "https://example.invalid/4SE.pth", "earlier_sha256": ["ab"]}, "earlier_sha256 must be a list of sha256 digests"),
     ({"url": "https://example.invalid/4SE.pth", "sha256": "1" * 64, "earlier_sha256": ["1" * 64]}, "lists the current sha256")],
)  # fmt: skip
def test_registry_refuses_bad_sources(registry: TempRegistry, bad: dict, message: str) -> None:
    se = next(f for f in real_entry(NAME)["files"] if f["name"] == "4SE.pth")
    f = {"name": "4SE.pth", "sha256": se["sha256"], "bytes": se["bytes"], **bad}
    registry.write({NAME: real_entry(NAME), "own": entry_json([f, registry.package("own/4SD.pth", b"x")], stages=[4])})
    with pytest.raises(zoo.ZooError, match=re.escape(message)):
        zoo.entries()


def test_registry_refuses_cycles_and_missing_stage_files(registry: TempRegistry) -> None:
    a = {"name": "4SE.pth", "from": "b/4SE.pth", "sha256": "0" * 64, "bytes": 1}
    b = {"name": "4SE.pth", "from": "a/4SE.pth", "sha256": "0" * 64, "bytes": 1}
    sd = registry.package("x/4SD.pth", b"x")
    registry.write({"a": entry_json([a, sd], stages=[4]), "b": entry_json([b, sd], stages=[4])})
    with pytest.raises(zoo.ZooError, match=r"cycle: a -> b -> a"):
        zoo.entries()
    registry.write({"a": entry_json([sd], stages=[4])})
    with pytest.raises(zoo.ZooError, match=r"model 'a' \(format cd, stages \[4\]\) lacks the file\(s\) 4SE\.pth"):
        zoo.entries()
    registry.write({"a": entry_json([sd], stages=[4, 4])})
    with pytest.raises(zoo.ZooError, match=r"\"stages\" must be a non-empty list of distinct stages"):
        zoo.entries()


def test_an_installed_file_whose_size_changed_is_refused_not_deleted(shared_dir: Path, no_network: None) -> None:
    """Truncated after install: refused as damaged (naming it), as a same-size change is; not removed and downloaded again."""
    d = zoo.import_local(NAME, shared_dir / "models" / NAME)
    victim = d / "3SD.pth"
    with open(victim, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(zoo.DamagedModelError) as ei:
        zoo.ensure(NAME, progress=False)
    assert str(victim) in str(ei.value) and "1000 bytes" in str(ei.value)
    assert victim.stat().st_size == 1000  # left for the user to see and repair


def test_import_local_names_every_corrupt_copy_and_installs_none(shared_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "copy"
    shutil.copytree(shared_dir / "models" / NAME, src)
    for name in ("3SE.pth", "5SD.pth"):
        (src / name).chmod(0o644)
        _flip_one_byte(src / name)
    with pytest.raises(zoo.ChecksumError) as ei:
        zoo.import_local(NAME, src)
    msg = str(ei.value)
    assert "3SE.pth" in msg and f"{src / '5SD.pth'} do not match either" in msg and "nothing was installed" in msg, msg
    d = zoo.model_dir(NAME)
    assert not d.exists() or not [p for p in d.iterdir() if p.suffix == ".pth"]  # the good files were not installed either


@pytest.mark.parametrize("mirror", ["http://[::1", "http://", "https:///models"])
def test_a_mirror_that_is_no_url_is_refused_naming_it(mirror: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app

    with pytest.raises(zoo.ZooError, match=r"mirror .*: (not a URL|no host)"):
        zoo.fetch(NAME, mirror=mirror, progress=False)
    r = CliRunner().invoke(app, ["models", "fetch", NAME, "--mirror", mirror])
    assert r.exit_code == 2 and "--mirror" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("timeout", [0, -1, float("inf"), float("nan")])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_refused_before_any_download(timeout: float) -> None:
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app

    with pytest.raises(ValueError, match="timeout: expected a positive number of seconds"):
        zoo.fetch(NAME, timeout=timeout, progress=False)
    r = CliRunner().invoke(app, ["models", "fetch", NAME, f"--timeout={timeout}"])
    assert r.exit_code == 2 and "--timeout" in r.output, r.output


def test_a_path_where_a_zoo_model_s_name_goes_is_named_as_a_path(tmp_path: Path) -> None:
    with pytest.raises(zoo.UnknownModelError, match="a path, where a zoo model's name goes"):
        zoo.get_entry(str(tmp_path))
    with pytest.raises(zoo.UnknownModelError, match="no such model folder"):
        zoo.get_entry(str(tmp_path / "nowhere"))


def test_check_installed_says_a_model_never_installed_is_not_installed_not_damaged() -> None:
    with pytest.raises(zoo.ZooError, match=f"{NAME} is not installed") as ei:
        zoo.check_installed(NAME)
    assert not isinstance(ei.value, zoo.DamagedModelError)


def test_a_model_of_packaged_files_needs_no_folder_and_its_path_fix_names_none(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ultrastyle.cli.main import app

    packaged = next(n for n, e in zoo.entries().items() if all(f.kind == "package" for f in e.files) and not e.depends_on)
    r = CliRunner().invoke(app, ["models", "path", packaged])
    assert r.exit_code == 1 and "nothing is downloaded" in " ".join(r.output.split()) and "DIR" not in r.output, r.output
    assert zoo.import_local(packaged) == zoo.model_dir(packaged)  # no folder needed (one that does not exist is refused, below)


@pytest.mark.parametrize("value", ["relhome", "./cache", " "])
def test_a_relative_home_is_refused_not_a_cache_per_working_folder(monkeypatch: pytest.MonkeyPatch, runner: CliRunner, value: str) -> None:
    monkeypatch.setenv("ULTRASTYLE_HOME", value)
    with pytest.raises(zoo.ZooError, match="is not an absolute path"):
        zoo.home_dir()
    r = runner.invoke(app, ["models", "path", NAME])
    assert r.exit_code == 1 and "ULTRASTYLE_HOME=" in r.stderr and "not an absolute path" in r.stderr, r.output
    monkeypatch.setenv("ULTRASTYLE_HOME", "")  # unset in effect: the default
    assert zoo.home_dir() == Path.home() / ".cache" / "ultrastyle"


def test_cli_import_interrupted_says_how_many_files_are_in_and_how_to_finish(runner: CliRunner, shared_dir: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    copy, calls = zoo._copy_verified, []

    def interrupted_at_the_fourth(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 4:
            raise KeyboardInterrupt
        copy(*args, **kwargs)

    monkeypatch.setattr(zoo, "_copy_verified", interrupted_at_the_fourth)
    r = runner.invoke(app, ["models", "import", NAME, str(shared_dir / "models" / NAME)])
    assert r.exit_code == 130, r.output
    assert f"interrupted: 3 of 10 files of {NAME} are installed" in r.stderr and "run the same command again" in r.stderr
    assert zoo.install_status(NAME) == "incomplete"
    monkeypatch.setattr(zoo, "_copy_verified", copy)
    r = runner.invoke(app, ["models", "import", NAME, str(shared_dir / "models" / NAME)])
    assert r.exit_code == 0 and f"imported {NAME}" in r.stdout and zoo.install_status(NAME) == "installed"
    r = runner.invoke(app, ["models", "import", NAME, str(shared_dir / "models" / NAME)])  # nothing to do: not "imported"
    assert r.exit_code == 0 and "already installed and verified" in r.stdout and "was not read" in r.stdout, r.output


def test_import_of_a_folder_that_does_not_exist_is_refused_even_where_unneeded(tmp_path: Path) -> None:
    with pytest.raises(zoo.ZooError, match="is not a directory"):
        zoo.import_local("ultrastyle-wct-64x", tmp_path / "nosuch")  # packaged files: no folder needed, but one was given


def test_remove_deletes_the_models_files_and_its_bundles_and_nothing_it_did_not_make(runner: CliRunner, shared_dir: Path) -> None:
    d = zoo.import_local(NAME, shared_dir / "models" / NAME)
    size = sum(f.bytes for f in zoo.get_entry(NAME).files)
    def bundle(folder: str, weights: dict[str, str]) -> Path:  # named as `select.bundle_dir_for` names them
        (zoo.bundles_dir() / folder / "int8").mkdir(parents=True)
        (zoo.bundles_dir() / folder / "manifest.json").write_text(json.dumps({"source_weights": weights}))
        return zoo.bundles_dir() / folder

    mine = {f.name: f.sha256 for f in zoo.get_entry(NAME).files if f.name.startswith("5")}
    ours = bundle(f"{NAME}-0123456789ab", mine)
    (ours / "int8" / "encoder5.onnx").write_bytes(b"x" * 1000)
    in_bundle = 1000 + len((ours / "manifest.json").read_bytes())
    others = [bundle(f"{NAME}-extra-0123456789ab", mine), bundle(f"{NAME}-0123", mine),  # another model's names
              bundle(f"{NAME}-fedcba987654", {**mine, "5SD.pth": "0" * 64})]  # a weights folder called cd-wct-16x: the user's own
    linked = zoo.bundles_dir() / f"{NAME}-aaaaaaaaaaaa"
    linked.symlink_to(bundle("elsewhere", mine), target_is_directory=True)  # unlinked, not followed
    r = runner.invoke(app, ["models", "remove", NAME, "--keep-bundles"])
    assert r.exit_code == 0 and f"removed {NAME}: 10 files from {d}" in " ".join(r.stdout.split()), r.output
    assert "kept 2 bundle(s)" in r.stdout and not d.exists() and ours.is_dir() and zoo.install_status(NAME) == "absent"
    assert zoo.remove(NAME) == zoo.Removed([], [ours, linked], in_bundle)
    assert all(o.is_dir() for o in others) and (zoo.bundles_dir() / "elsewhere" / "manifest.json").is_file() and not linked.exists()
    r = runner.invoke(app, ["models", "remove", NAME])
    assert r.exit_code == 0 and "nothing removed" in r.stdout, r.output
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    (d / "notes.txt").write_text("mine")  # a file the cache did not make keeps the folder
    removed = zoo.remove(NAME)
    assert removed.freed == size and len(removed.files) == 10 and sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    r = runner.invoke(app, ["models", "remove", "no-such-model"])
    assert r.exit_code == 2 and "no-such-model" in r.stderr


def test_remove_of_a_linked_model_folder_unlinks_it_and_keeps_what_it_points_to(runner: CliRunner, shared_dir: Path,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    shared = tmp_path / "shared-copy"
    shutil.copytree(shared_dir / "models" / NAME, shared)
    zoo.model_dir(NAME).parent.mkdir(parents=True, exist_ok=True)
    zoo.model_dir(NAME).symlink_to(shared, target_is_directory=True)
    assert zoo.install_status(NAME) == "installed"
    r = runner.invoke(app, ["models", "remove", NAME])
    assert r.exit_code == 0 and f"the link {zoo.model_dir(NAME)} (the folder it points to is kept)" in " ".join(r.stdout.split()), r.output
    assert not zoo.model_dir(NAME).is_symlink() and zoo.install_status(NAME) == "absent"
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in (shared_dir / "models" / NAME).iterdir())


def test_cli_list_as_json_and_on_a_narrow_terminal_keeps_every_name_whole(runner: CliRunner, shared_dir: Path) -> None:
    zoo.import_local(NAME, shared_dir / "models" / NAME)
    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)}
    assert set(rows) == set(zoo.entries()) and rows[NAME]["status"] == "installed" and rows["cd-16x-pruned-base"]["status"] == "absent"
    assert rows[NAME]["bytes"] == zoo.get_entry(NAME).total_bytes and rows[NAME]["path"] == str(zoo.model_dir(NAME))
    r = runner.invoke(app, ["models", "list"], env={"COLUMNS": "50"})
    assert r.exit_code == 0, r.output
    for name, entry in zoo.entries().items():  # the table cut names (ultrastyle-adain-1…) and dropped the source column
        assert name in r.stdout and "+".join(entry.source_kinds[:1]) in r.stdout
    described = [ln for ln in r.stdout.splitlines() if ln.startswith("  ") and " files, " not in ln]
    assert len(described) > 10 and max(map(len, described)) <= 50 and ", stage 4, " in r.stdout  # folded (400+ columns before)


def test_a_zoo_name_is_the_zoos_verified_model_whatever_folder_of_that_name_is_here(shared_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """A folder named cd-wct-16x in the working directory silently replaced the default model, unverified."""
    import torch

    from ultrastyle.export.bundle import is_bundle
    from ultrastyle.models import sources, zoo
    from ultrastyle.models.pretrained import load_model

    zoo.import_local("cd-wct-16x", shared_dir / "models" / "cd-wct-16x")
    here = tmp_path / "cwd"
    shutil.copytree(shared_dir / "models" / "cd-wct-16x", here / "cd-wct-16x")
    sd = torch.load(here / "cd-wct-16x" / "1SD.pth", weights_only=True, map_location="cpu")
    weights = sd.get("model", sd)  # CD's {"model": state_dict} or the state dict itself
    for k, v in weights.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            weights[k] = -v
    torch.save(sd, here / "cd-wct-16x" / "1SD.pth")
    monkeypatch.chdir(here)
    monkeypatch.setattr(sources, "_SHADOWED", set())
    first = lambda m: next(iter(m.decoders[1].state_dict().values()))  # noqa: E731
    with pytest.warns(UserWarning, match=r"'cd-wct-16x' is the zoo's model cd-wct-16x; the folder of that name here is not used \(give ./cd-wct-16x"):
        zoo_model = load_model("cd-wct-16x", stages=(1,))
    assert sources.model_folder("cd-wct-16x") is None and sources.model_folder("./cd-wct-16x") == Path("./cd-wct-16x")
    local = load_model("./cd-wct-16x", stages=(1,))  # asked for as a folder: that folder
    assert torch.equal(first(local), -first(zoo_model))
    from ultrastyle.api import model_source
    from ultrastyle.distill.config import DistillConfig, write_yaml

    assert model_source(Path("cd-wct-16x")) == here / "cd-wct-16x"  # a Path stays that folder when kept as text later
    write_yaml(DistillConfig(teacher="cd-wct-16x", images="p", out="o", stage=1), tmp_path / "c.yaml")
    assert "teacher: cd-wct-16x\n" in (tmp_path / "c.yaml").read_text()  # not this folder's absolute path, for a resume
    (here / "cd-wct-16x" / "manifest.json").write_text("{}")  # as a bundle of that name would have
    assert not is_bundle("cd-wct-16x") and is_bundle("./cd-wct-16x") and is_bundle(Path("cd-wct-16x"))  # a Path is a folder
    from ultrastyle.deploy import _as_bundle

    assert _as_bundle("cd-wct-16x").path.parent.name == "bundles"  # build_tensorrt: the zoo's cached bundle, as calibrate's
