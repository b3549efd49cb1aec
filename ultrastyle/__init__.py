"""ultrastyle: ultra-resolution universal style transfer."""

__version__ = "0.1.0"
