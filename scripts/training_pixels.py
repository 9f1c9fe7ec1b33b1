"""Images as sequences for autoregressive image modelling (run_pixel_modeling.py, and the study in benchmarks/): a
start token (`START`), then the sub-pixels in raster order (row, column, channel), each one of 256 classes.

    processor = training_pixels.image_processor(images[:1], image_size)   # resize only: values stay 0..255
    ids = training_pixels.to_sequences(images, processor)                  # (N, 1 + H*W*C)
"""

import numpy as np
import training_data
from PIL import Image
from transformers import ViTImageProcessorPil

START = 256  # the start token; sub-pixel values are 0..255


def image_processor(images, image_size: int | None) -> ViTImageProcessorPil:
    """Resize only: values stay 0..255 (no rescaling, no normalisation), so they are the 256 classes."""
    height, width = (image_size, image_size) if image_size else images[0].size[::-1]
    channels = 1 if training_data.image_mode(images[0]) == "L" else 3
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": height, "width": width},
        resample=Image.Resampling.BILINEAR,
        do_rescale=False,
        do_normalize=False,
        image_mean=[0.5] * channels,
        image_std=[0.5] * channels,
    )


def to_sequences(images, processor) -> np.ndarray:
    """PIL images -> (N, 1 + H*W*C) token ids: the start token, then sub-pixels in (row, column, channel) order."""
    mode = "L" if len(processor.image_mean) == 1 else "RGB"
    pixels = processor([training_data.as_8bit(img, mode) for img in images], return_tensors="np")["pixel_values"]
    pixels = np.rint(pixels).clip(0, 255).astype(np.int64).transpose(0, 2, 3, 1).reshape(len(images), -1)
    return np.concatenate([np.full((len(images), 1), START), pixels], axis=1)
