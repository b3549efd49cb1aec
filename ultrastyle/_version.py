"""The package version: one place, read by pyproject.toml and by modules that stamp their outputs."""

__version__ = "0.1.0"
