"""broker: an ephemeral credential broker for AI coding agents."""

__version__ = "0.1.0"
