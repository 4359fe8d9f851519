"""Evaluations of captioners: the judge-scored before/after table (captioning.py)."""
