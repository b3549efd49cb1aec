"""Parameter types the commands share."""

from __future__ import annotations

from enum import Enum

import typer

DEVICE_METAVAR = "cpu|cuda[:N]"


class Metadata(str, Enum):
    """`io.metadata.METADATA`, spelled here: that module imports torch, which `--help` does without."""

    keep = "keep"
    all = "all"
    none = "none"


METADATA_HELP = ("What outputs keep of the content file's metadata: keep (its DPI, scaled with --content-size, and EXIF "
                 "without GPS), all (GPS too), none.")  # fmt: skip


def device(value: str) -> str:
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` in any case (`ultrastyle.options.device`), as lower case."""
    from ultrastyle import options

    try:
        return options.device("device", value)
    except options.OptionError as exc:
        raise typer.BadParameter(exc.message) from None


def require_cuda(device: str) -> None:
    """Exit 2 with one line where PyTorch has no CUDA device for ``device`` (``cuda``, ``cuda:N``); the CPU always runs."""
    if not device.startswith("cuda"):
        return
    from rich.console import Console

    from ultrastyle.options import cuda_shortfall
    from ultrastyle.runtime.backends.select import cuda_count

    count = cuda_count()
    if (why := cuda_shortfall(device, count)) is not None:
        fix = "give one of them" if count else "use --device cpu"
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: --device {device}: {why}; {fix}", style="red", markup=False)
        raise typer.Exit(2)
