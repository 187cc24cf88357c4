"""Sensitivity analysis, a budget planner across every method, Pareto sweeps and reports.

- :mod:`.sweeps`: per method, the knob swept per layer and how to build its parameters.
- :mod:`.split`: the validation split carved from the training data (selection never sees the
  test set).
- :mod:`.sensitivity`: each layer alone at each setting: accuracy and real encoded bytes.
- :mod:`.planner`: per-layer methods and settings for a byte target, run with fine-tuning.
- :mod:`.pareto`: a grid across methods, accuracy against file bytes and latency.
- :mod:`.energy` and :mod:`.report`: metrics of a run folder as report.md and report.html.
"""

from deepsqueeze.analysis.sweeps import SWEEPS, Option, Sweep, available_sweeps

__all__ = ["SWEEPS", "Option", "Sweep", "available_sweeps"]
