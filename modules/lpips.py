"""LPIPS without downloads: torchmetrics' LPIPS, allowed to start only when its backbone weights are on disk.

torchmetrics ships the small LPIPS linear heads, but its backbone (AlexNet, VGG16 or SqueezeNet 1.1 from
torchvision) is an ImageNet download into ``$TORCH_HOME/hub/checkpoints`` on first use, which fails offline in
the middle of a run. `load_lpips` checks for the file first and fails at once, naming the file, the place to
put it and where to get it.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

BACKBONE_WEIGHTS = {  # torchmetrics net_type -> torchvision weights enum name
    "alex": "AlexNet_Weights",
    "vgg": "VGG16_Weights",
    "squeeze": "SqueezeNet1_1_Weights",
}


def backbone_url(net_type: str) -> str:
    if net_type not in BACKBONE_WEIGHTS:
        raise ValueError(f"lpips net_type must be one of {sorted(BACKBONE_WEIGHTS)}, got {net_type!r}")
    import torchvision.models

    return getattr(torchvision.models, BACKBONE_WEIGHTS[net_type]).DEFAULT.url


def backbone_path(net_type: str) -> Path:
    """Where torchvision looks for the backbone weights: $TORCH_HOME/hub/checkpoints/<file from the URL>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(backbone_url(net_type)).path)


def load_lpips(net_type: str = "alex") -> LearnedPerceptualImagePatchSimilarity:
    """torchmetrics LPIPS (inputs in [0, 1]) with a frozen backbone, or FileNotFoundError when the backbone
    weights are not on disk (never a download)."""
    path = backbone_path(net_type)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS ({net_type}) needs the torchvision backbone weights file {path.name}, not found at {path}. "
            f"Nothing is downloaded at run time: fetch {backbone_url(net_type)} on a machine with network access "
            f"and copy it to {path} (the directory follows $TORCH_HOME, now "
            f"{os.environ.get('TORCH_HOME', 'unset: ~/.cache/torch')}), or switch LPIPS off "
            "(lpips_weight: 0, lpips_metric: false)."
        )
    metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, normalize=True)
    metric.requires_grad_(False)
    return metric
