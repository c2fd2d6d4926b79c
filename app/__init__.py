"""Intent-detection service: FastAPI + ONNX Runtime over the committed CLINC150 model."""

import os

# One worker is one thread (ONNX Runtime's, INTENT_ORT_INTRA_THREADS). numpy's OpenBLAS would otherwise start a
# thread per core when first imported, and the OOS rule's neighbour scan is a product large enough to use them: two
# workers on two cores then spin against each other, and the peak fell to a third (740 against 2,130 req/s for a
# student with 600 x 768 prototypes; 368 against 840 for the served model; docs/experiments.md). Set here, before
# anything imports numpy, so every entry point and the workers uvicorn spawns inherit it; a value already in the
# environment wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
