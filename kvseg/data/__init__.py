"""Data: dataset folders, masks, splits, the folder check, the synthetic stand-in, the frame cache, datasets and augmentation.

Owns everything between files on disk and a batch of tensors: reading images and masks
(``folder``, ``masks``, ``encodings``), splits (``splits``), the check a user runs first (``check``),
the stand-in (``synthetic``), the on-disk cache of decoded frames (``preprocessed``), the PyTorch
dataset and loaders (``dataset``) and the albumentations pipelines (``augment``).

May import: :mod:`kvseg.errors`, :mod:`kvseg.config`, :mod:`kvseg.files`, :mod:`kvseg.runtime`.
"""
