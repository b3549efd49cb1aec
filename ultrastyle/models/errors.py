"""The model zoo's base error, below everything that raises it.

The registry (`models.registry`), the defaults' validation (`models.defaults`)
and installing (`models.zoo`) all raise `ZooError`s; every command that
reports zoo errors catches this one class. `models.registry` and
`models.zoo` re-export it.
"""

from __future__ import annotations


class ZooError(RuntimeError):
    """Base class of every model-zoo error; the message says what to do."""
