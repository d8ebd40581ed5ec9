"""Fused LeapAlign ops. Pure tensor code: nothing here imports the rest of leapalign_fast.

Public ops dispatch to Triton for CUDA tensors (and for CPU tensors under TRITON_INTERPRET=1),
and to the PyTorch references in `reference.py` otherwise.
"""

from .reference import connect_discount_ref, connect_ref, similarity_weight_ref

# Until the Triton kernels land, the public ops are the references.
connect = connect_ref
connect_discount = connect_discount_ref
similarity_weight = similarity_weight_ref

__all__ = ["connect", "connect_discount", "similarity_weight"]
