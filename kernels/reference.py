"""PyTorch references for the fused ops, written as the math they replace.

Shapes: `x_*` are batch-first tensors of any rank (B, ...); distances are (B,) float32.
`sg` is stop-gradient (`.detach()`).
"""

import torch


def connect_ref(x_pred: torch.Tensor, x_real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent connector: value of `x_real`, gradient identity to `x_pred`; plus mean|x_real - x_pred|."""
    x_conn = x_pred + (x_real - x_pred).detach()
    dist = distance_ref(x_pred, x_real)
    return x_conn, dist


def connect_discount_ref(
    x_pred: torch.Tensor, x_real: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Connector plus the discounted copy `alpha * x_conn + (1 - alpha) * sg(x_conn)` (value `x_real`)."""
    x_conn, dist = connect_ref(x_pred, x_real)
    x_disc = alpha * x_conn + (1.0 - alpha) * x_conn.detach()
    return x_conn, x_disc, dist


def distance_ref(x_pred: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """(B,) float32 mean absolute difference over all non-batch dims, no grad. The difference and the mean are taken
    in the inputs' dtype or float32, whichever is wider (float64 states: the two nearly equal latents are subtracted
    in float64, only the distance is rounded to float32)."""
    with torch.no_grad():
        acc = torch.promote_types(x_real.dtype, torch.float32)
        diff = (x_real.to(acc) - x_pred.to(acc)).abs()
        return diff.reshape(diff.shape[0], -1).mean(dim=1).float()


def similarity_weight_ref(d_j: torch.Tensor, d_0: torch.Tensor, tau: float) -> torch.Tensor:
    """Trajectory-similarity weight 1 / (max(d_j, tau) + max(d_0, tau)), no grad."""
    with torch.no_grad():
        return 1.0 / (d_j.float().clamp_min(tau) + d_0.float().clamp_min(tau))
