"""Experiments: questions answered by runs (experiments/README.md). `python -m experiments.run
experiments/<name>.py` runs one; demo_seeds.py runs the demo over seeds."""
