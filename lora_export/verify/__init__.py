"""Parity (pure functions over numpy) and latency (which owns all timing)."""
