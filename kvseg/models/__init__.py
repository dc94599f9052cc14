"""Models: the networks that map normalised images (B, 3, H, W) to logits (B, 1, H, W), and the losses they train with.

``unet`` is the study's U-Net; ``losses`` the training losses (the same object is optimised and reported).

May import: :mod:`kvseg.errors`, :mod:`kvseg.config`.
"""
