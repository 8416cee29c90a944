"""Benchmarks: speed, memory and efficacy measurements on the real models; run each as ``python -m benchmarks.NAME``
from the repository root. Results (summaries only, never generated text) go to ``benchmarks/results/``."""
