"""sparsekit microbenchmarks (installed as ``sparsekit.bench``).

* ``harness``  -- timing (``triton.testing.do_bench`` over rotated input sets),
  the ``Row`` record, and the CSV / markdown / plot writers.
* ``sparse24`` -- the 2:4 sparse linear cases and its CPU correctness sweep.
* ``run``      -- the command line (``sparsekit bench`` / ``python -m sparsekit.bench``).

Results are committed under ``bench/results/<gpu-name-slug>/``.
"""
