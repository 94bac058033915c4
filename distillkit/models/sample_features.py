"""A distribution measure for diffusion samples: the Fréchet distance (FID's formula) between Gaussian fits of
features of a small fixed network.

The network is not a trained Inception: it is three 3x3 convolutions (32, 64, 64 channels, strides 1, 2, 2, ReLU)
and a global average, with weights drawn from a fixed seed (:data:`FEATURE_SEED`, He-normal), so that any sample
shape (pixels or latents, any channel count) gets the same, reproducible features on every machine. Its numbers
compare models within one bench run (smaller is closer to the reference distribution); they are not comparable to
published FID values.

Videos [N, C, F, H, W] are measured frame by frame: each frame is one sample of the distribution (N * F features),
so a model is scored on what its frames look like, not on motion.
"""

from __future__ import annotations

from typing import Any

FEATURE_SEED = 0
FEATURE_WIDTHS = (32, 64, 64)
FEATURE_STRIDES = (1, 2, 2)


class SampleFeatures:
    """The fixed feature network for samples with ``channels`` channels; ``features(x)`` is [N, 64] (float64) for
    images [N, C, H, W], and [N * F, 64] for videos [N, C, F, H, W] (frames as images, video by video)."""

    def __init__(self, channels: int, device: Any = "cpu"):
        import torch

        gen = torch.Generator().manual_seed(FEATURE_SEED)
        self.weights = []
        c_in = channels
        for c_out in FEATURE_WIDTHS:
            std = (2.0 / (c_in * 9)) ** 0.5
            w = torch.randn(c_out, c_in, 3, 3, generator=gen) * std
            self.weights.append(w.to(device))
            c_in = c_out

    def features(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        h = x.float()
        if h.dim() == 5:
            h = h.transpose(1, 2).flatten(0, 1)  # [N, C, F, H, W] -> [N * F, C, H, W]
        with torch.no_grad():
            for w, stride in zip(self.weights, FEATURE_STRIDES, strict=True):
                h = F.relu(F.conv2d(h, w.to(h.device), stride=stride, padding=1))
        return h.mean(dim=(2, 3)).double()


def gaussian_stats(features: Any) -> tuple[Any, Any]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D] (float64)."""
    import torch

    f = features.double()
    return f.mean(0), torch.cov(f.T)


def frechet_distance(stats_a: tuple[Any, Any], stats_b: tuple[Any, Any]) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``; the trace of the square root is taken as the sum
    of the square roots of the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)`` (symmetric PSD, so no complex parts)."""
    import torch

    mu_a, s_a = stats_a
    mu_b, s_b = stats_b
    vals, vecs = torch.linalg.eigh(s_a)
    root_a = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T
    middle = root_a @ s_b @ root_a
    tr_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    fd = float(((mu_a - mu_b) ** 2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_root)
    return max(fd, 0.0)
