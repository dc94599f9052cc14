"""Models: the networks that map normalised images (B, 3, H, W) to logits (B, 1, H, W), and the losses they train with.

``build`` is the registry (``model.arch`` -> network, input multiple, smallest size); ``unet`` the
study's U-Net; ``light`` kvseg's CPU-native light model; ``library`` the architectures and encoders
of segmentation_models_pytorch (optional); ``losses`` the training losses (the same object is
optimised and reported).

May import: :mod:`kvseg.errors`, :mod:`kvseg.config`.
"""
