"""label_reg: weakly-supervised MR-to-TRUS prostate registration in TensorFlow 2 / Keras 3.

Array convention used throughout the package: a 3-D volume is a numpy/TF array in ITK index order
(i, j, k) = (x, y, z), i.e. ``sitk.GetArrayFromImage(img).T``; batched tensors are (B, X, Y, Z, C).
Displacements (DDFs) are in voxels along those three axes unless a name says ``_mm``.
"""
import os as _os

# Keep TensorFlow's C++ start-up chatter out of the console; a user can still override it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
