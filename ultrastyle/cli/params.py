"""Parameter types the commands share."""

from __future__ import annotations

import typer

DEVICE_METAVAR = "cpu|cuda[:N]"


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
    import torch
    from rich.console import Console

    from ultrastyle.options import device_index

    def error_line(message: str) -> None:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"error: {message}", style="red", markup=False)

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device_index(device)
    if count == 0:
        error_line(f"--device {device}: no CUDA device is available to PyTorch here; use --device cpu")
        raise typer.Exit(2)
    if index >= count:
        error_line(f"--device {device}: PyTorch sees {count} CUDA device(s) here, cuda:0 to cuda:{count - 1}; give one of them")
        raise typer.Exit(2)
