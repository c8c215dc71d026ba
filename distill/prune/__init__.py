"""Minitron: structured pruning of the teacher into the student's initial weights (docs/minitron.md)."""
