"""The one map from config dtype names to torch dtypes: a leaf (imports only torch), so the models and the rewards
both read it without either importing the other."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
