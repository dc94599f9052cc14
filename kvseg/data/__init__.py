"""Data: dataset folders, masks, splits, the folder check, preprocessing, the synthetic stand-in, the frame cache,
datasets and augmentation.

Owns everything between files on disk and a batch of tensors: reading images and masks
(``folder``, ``masks``, ``encodings``), splits (``splits``), the check a user runs first (``check``),
preprocessing once per machine and its records (``prepare``), the stand-in (``synthetic``), the
on-disk cache of decoded frames (``preprocessed``), the PyTorch dataset and loaders (``dataset``),
the albumentations pipelines (``augment``) and their twin per batch on the device (``device_augment``).

May import: :mod:`kvseg.errors`, :mod:`kvseg.config`, :mod:`kvseg.files`, :mod:`kvseg.runtime`.
"""
