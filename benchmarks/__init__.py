"""isle-fast benchmarks: ``python -m benchmarks [--quick] [--only NAME,...]`` (or ``isle bench``).

One module per step (``python -m benchmarks.<name> [--quick]``): each prints a
table, measures a reference implementation in the same run and writes JSON
(and PNG plots) to ``benchmarks/results/``. :mod:`benchmarks.common` holds the
shared helpers (timing, machine info, JSON, log-log fits and plots, synthetic
VOC-scale stores); :mod:`benchmarks.__main__` runs them all and writes
``summary.json`` and ``SUMMARY.md``.
"""
