"""hypseg: unsupervised segmentation of 3D biomedical volumes with hyperbolic VAEs."""

__version__ = "0.1.0"
