"""Whole-model jobs as library calls (above caldera_jax.caldera and checkpoints_io; below the CLIs).

compress.py   CALDERA compression of a whole model: CompressJob, Callbacks, run
job_dir.py    the output directory: lock, identity, resume against recorded digests, --overwrite
report.py     per-layer rows, totals, the printed table, the error plot
"""
