"""Held-out evaluation in bits per byte (see `run.py`)."""
