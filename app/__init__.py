"""Intent-detection service: FastAPI + ONNX Runtime over the committed CLINC150 model."""
