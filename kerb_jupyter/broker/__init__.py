"""The credential broker: verifies a caller's AWS identity and issues that user's service tickets by S4U."""

from __future__ import annotations
