"""The model factory: CLINC150 (or a team's own examples) -> a served artifact, stage by stage (teacher, search,
distill, prune, export, quantize, embedder, oos, static, artifact, bench).

Imports go one way: the factory imports the engine from ``app.engine`` (spec, rules, the Engine itself), so it
writes and measures exactly what serves; nothing in ``app`` imports from here, and the serving image ships only
``app/``.
"""

# Before numpy loads: the service's one thread per worker for numpy's BLAS (app/__init__.py), so that the factory's
# benchmarks time the engine as it serves.
import app  # noqa: F401
