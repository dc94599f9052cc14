"""kvseg: train, export and benchmark U-Nets for instrument segmentation in endoscopy images."""

__version__ = "0.1.0"
