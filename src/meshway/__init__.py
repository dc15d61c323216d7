"""Meshway: a sidecarless service mesh."""

__version__ = "0.1.0"
