"""Ahead-of-time compilation of every program an RL step runs, for a target that need not be
here: a TPU pod slice (through libtpu's topology description) or a simulated N-device mesh.
`mode=compile` (`report.py`) prints and writes each program's per-chip memory, FLOPs, bytes,
collectives and roofline step time against a model-formula ideal."""
