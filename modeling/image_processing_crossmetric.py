"""The image processor saved with every exported model.

It is a stock transformers class (``CLIPImageProcessor``: resize the shortest edge to ``image_size / crop_pct``,
centre-crop ``image_size``, rescale, normalise), configured from the timm data config that the model's config
carries. A stock class, rather than a custom one, so that ``AutoImageProcessor`` and the
``image-feature-extraction`` pipeline load it with no remote code and no trust question (an ``auto_map`` in
``preprocessor_config.json`` would make the stock pipeline ask one).
"""

from __future__ import annotations

import math

from transformers import CLIPImageProcessor
from transformers.image_utils import PILImageResampling

from .configuration_crossmetric import CrossMetricConfig

_RESAMPLING = {
    "lanczos": PILImageResampling.LANCZOS,  # transformers.js: sharp's antialiased lanczos3 resize, as PIL's
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "nearest": PILImageResampling.NEAREST,
}


def build_image_processor(config: CrossMetricConfig) -> CLIPImageProcessor:
    """The evaluation-time preprocessing of ``config`` as timm does it (resize by ``crop_pct``, centre crop)."""
    resize_to = int(math.floor(config.image_size / config.crop_pct))
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": resize_to},
        resample=_RESAMPLING[config.interpolation],
        do_center_crop=True,
        crop_size={"height": config.image_size, "width": config.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        do_convert_rgb=True,
    )
