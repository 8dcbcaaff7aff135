"""Benchmarks: device profiles (``devices``) and the latency harness (``latency``)."""
from __future__ import annotations
