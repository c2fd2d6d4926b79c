"""The model factory: teacher -> distilled, pruned, graph-optimised int8 ONNX student.

Imports go one way: the factory imports the service's artifact contract from ``app`` (card schema,
OOS rules, cascade rule, runtime), so it writes and measures exactly what serves; nothing in ``app``
imports from here, and the serving image ships only ``app/``.
"""
