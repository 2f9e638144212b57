"""Inference: the :class:`~.detector.Detector` (the test-time protocol in one module), the PyTorch
``Predictor`` around it, ``evaluate()`` over datasets, the predictor interface the ONNX runtime
shares, and reading images / writing maps and overlays (``images.py``, torch-free).

Nothing is imported here, so the torch-free modules (``images``, ``interface``, ``settings``) load
without torch."""
