"""Fused LeapAlign ops. Pure tensor code: nothing here imports the rest of leapalign_fast.

Public ops dispatch to Triton for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1),
and to the PyTorch references in `reference.py` otherwise; `impl="triton" | "reference"` forces a path.
"""

from .connector import connect, connect_discount
from .reference import connect_discount_ref, connect_ref, distance_ref, similarity_weight_ref
from .similarity import similarity_weight

__all__ = [
    "connect",
    "connect_discount",
    "similarity_weight",
    "connect_ref",
    "connect_discount_ref",
    "distance_ref",
    "similarity_weight_ref",
]
