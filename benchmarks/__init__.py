"""The lab: the studies behind docs/results, the perf probes and the infrastructure they share.

* :mod:`benchmarks.lab`: the run store and run keys (``runs``), the scheduler (``scheduler``), the statistics
  (``stats``), the results JSON and provenance (``common``) and the docs filling (``fill_docs``);
* one module per study, each run from the repository root as ``python -m benchmarks.<study>``: ``premise``,
  ``recipe``, ``tuning`` (the recipe's tuning tasks), ``regimes``, ``generalization``, ``fidelity``,
  ``robust_defaults``, and ``studies`` (several studies in one pool of runs);
* :mod:`benchmarks.perf`: the probes of cost and behaviour, ``python -m benchmarks.perf.<probe>``: ``overhead``,
  ``gpu_check`` (also ``python benchmarks/gpu_check.py``, the path the GPU bundle runs), ``staleness``,
  ``ddp_comm``, ``run_size``, and two scripts that import only ``lit_deltasam`` so that ``PYTHONPATH`` picks the
  tree under test (``bit_identity``, ``side_by_side``).
"""
