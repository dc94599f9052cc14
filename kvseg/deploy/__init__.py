"""Deploy: ONNX export with verification, int8 quantisation, inference backends, and predicting images.

``onnx_model`` (the graph and its ``kvseg.*`` metadata), ``export`` (each precision verified before it
is kept), ``quantize``, ``backends`` (PyTorch, ONNX Runtime, OpenVINO, each behind one interface) and
``predict`` (:class:`~kvseg.deploy.predict.Predictor`). Never loads matplotlib.

May import: :mod:`kvseg.evaluation` (scoring and the overlay), :mod:`kvseg.runs`, :mod:`kvseg.data`,
:mod:`kvseg.models` and the base modules.
"""
