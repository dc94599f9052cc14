"""Video: reading and writing video (``io``), the three-thread pipeline (``pipeline``) and segmenting a source (``segment``).

Every frame goes through a :class:`kvseg.deploy.predict.Predictor`, as still images do.

May import: :mod:`kvseg.deploy`, :mod:`kvseg.evaluation` (the overlay and TTA) and the base modules.
"""
