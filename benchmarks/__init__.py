"""snapshotd's benchmark harness: ``python -m benchmarks`` (``make bench``).

Every figure is a ratio to a physical limit or a peer measured in the same run, on the
same data (DESIGN.md §9; docs/PERFORMANCE.md has the results and how to read them).

Layout:

- :mod:`benchmarks.harness`: the case registry (:func:`~benchmarks.harness.case`), the
  :class:`~benchmarks.harness.Bench` lifecycle, the interleaved runner and the statistics;
- :mod:`benchmarks.states`: the states measured (named specs, built deterministically);
- :mod:`benchmarks.cases`: the registered cases (limits, peers, snapshotd); a new kind of
  measurement is a new module there;
- :mod:`benchmarks.targets`: the issue's targets as data, evaluated, never asserted;
- :mod:`benchmarks.report`: the table and the JSON document;
- :mod:`benchmarks.system`: the machine's description, filesystem checks, page-cache
  control (``posix_fadvise`` per file only);
- :mod:`benchmarks.cli`: the command line.
"""
