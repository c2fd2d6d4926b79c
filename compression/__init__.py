"""The model factory: teacher -> distilled, pruned, graph-optimised int8 ONNX student.

Nothing outside this package imports from it; the service reads only the artifact
contract under ``models/``.
"""
