"""presence-hub: real-time presence for unified communications."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
