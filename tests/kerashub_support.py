"""Tiny random KerasHub presets, made and saved with KerasHub's own classes (tests and bench):
what a downloaded preset folder holds (config.json, model.weights.h5, image_converter.json,
metadata.json), only a few kilobytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: ImageNet mean/std as a DINOv2 converter applies them to 0..255 pixels.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_tiny_preset(folder: Path, *, registers: int = 0, seed: int = 0, image_size: int = 28,
                     patch_size: int = 4, width: int = 32, layers: int = 2, heads: int = 2,
                     mlp_ratio: int = 2, interpolation: str = "bilinear",
                     antialias: bool = True, version: int = 2) -> Path:
    """A 2-layer DINOv2 (DINOv3 with `version=3`: rotary position embeddings) of width 32 with
    its image converter, saved as a preset in `folder` (other sizes for the bench: DINOv2-S/14
    is 12 layers, width 384, 6 heads, mlp_ratio 4)."""
    from extract.kerashub import load_keras_hub

    hub = load_keras_hub()
    import keras

    keras.utils.set_random_seed(seed)
    sizes = {"patch_size": patch_size, "num_layers": layers, "hidden_dim": width,
             "num_heads": heads, "intermediate_dim": mlp_ratio * width,
             "num_register_tokens": registers, "image_shape": (image_size, image_size, 3)}
    if version == 3:
        backbone = hub.models.DINOV3Backbone(**sizes)
    else:
        backbone = hub.models.DINOV2Backbone(
            **sizes, position_embedding_shape=(max(32, image_size), max(32, image_size), 3))
    converter = getattr(hub.layers, f"DINOV{version}ImageConverter")(
        image_size=(image_size, image_size), scale=[1 / (255 * s) for s in STD],
        offset=[-m / s for m, s in zip(MEAN, STD)], interpolation=interpolation,
        antialias=antialias)
    folder = Path(folder)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


def make_tiny_tower(kind: str, folder: Path, layers: int = 1) -> tuple[Any, Any]:
    """A SigLIP or CLIP image tower (16 px, patch 4, width 16) and its converter, both saved as
    a preset in `folder`; returns (tower, converter)."""
    from extract.kerashub import load_keras_hub

    hub = load_keras_hub()
    sizes = {"patch_size": 4, "hidden_dim": 16, "num_layers": layers, "num_heads": 2,
             "intermediate_dim": 32, "image_shape": (16, 16, 3)}
    if kind == "siglip":
        tower = hub.models.SigLIPVisionEncoder(**sizes)
        converter = hub.layers.SigLIPImageConverter(image_size=(16, 16), scale=1 / 127.5,
                                                    offset=-1.0)
    else:
        tower = hub.models.CLIPVisionEncoder(**sizes)
        converter = hub.layers.CLIPImageConverter(image_size=(16, 16), scale=1 / 255.0)
    tower.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return tower, converter


if __name__ == "__main__":  # python -m tests.kerashub_support DIR
    import sys

    print(make_tiny_preset(Path(sys.argv[1]), registers=int(sys.argv[2]) if len(sys.argv) > 2 else 0))
