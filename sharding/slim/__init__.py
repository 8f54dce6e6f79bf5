"""Slimming a converted package: activation-aware int4 (AWQ, GPTQ), structured
pruning (FFN channels, whole layers), distillation, and one quality report.

Every method writes an ordinary package (``package.py``'s layout and
``manifest.py``'s manifest), so plans, the mesh and every backend use it
unchanged; ``manifest.extra["slim"]`` records the method, its parameters,
the calibration text's digest and the measured quality (``measure.py``).
See docs/SLIMMING.md.
"""
