"""The serving engine: a strict spec (`spec`), an artifact read and verified against it (`artifact`), and one
`Engine` that runs texts through tokenize -> stages -> OOS rule. It knows nothing of HTTP; the service, the
factory's evaluation and every benchmark run it."""
