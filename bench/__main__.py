"""``python -m edgemesh.bench``: run every benchmark and regenerate docs/BENCHMARKS.md."""

from edgemesh.bench.all import main

main()
