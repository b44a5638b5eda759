"""The blocks of a keras.applications backbone, for unfreezing the top N of them."""

from __future__ import annotations

import re
from typing import Any

# Layer-name patterns that give a layer's block, tried in order; a weighted layer matching
# none of them is a block of its own.
_BLOCK_PATTERNS = (
    re.compile(r"^(block\d+[a-z]?)_"),  # VGG (block5_conv1), EfficientNet (block7a_...)
    re.compile(r"^(block_\d+)_"),  # MobileNetV2
    re.compile(r"^(conv\d+_block\d+)_"),  # ResNet, DenseNet
    re.compile(r"^conv_(?:dw|pw|pad)_(\d+)"),  # MobileNet
    re.compile(r"^(stage_\d+_block_\d+)"),  # ConvNeXt (convnext_tiny_stage_3_block_2_...)
)


def is_batch_norm(layer: Any) -> bool:
    """True for BatchNormalization layers (kept frozen and in inference mode)."""
    return type(layer).__name__ == "BatchNormalization"


def _block_key(layer: Any) -> str | None:
    name = layer.name.replace("convnext_tiny_", "")
    for pattern in _BLOCK_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return layer.name if layer.weights else None


def backbone_blocks(base: Any) -> list[list[Any]]:
    """Layers grouped into blocks, bottom to top; only blocks holding weights are kept."""
    blocks: dict[str, list[Any]] = {}
    for layer in base.layers:
        key = _block_key(layer)
        if key is not None:
            blocks.setdefault(key, []).append(layer)
    return [layers for layers in blocks.values() if any(l.weights for l in layers)]


def unfreeze_top(base: Any, count: int | None) -> list[str]:
    """Make the top `count` blocks trainable (all when None); BatchNorm stays frozen.

    Returns the names of the layers that became trainable. A KerasHub vision transformer's
    blocks are its transformer layers (extract/kerashub.py; LayerNorms stay frozen).
    """
    from extract.kerashub import unfreeze_hub_top

    hub = unfreeze_hub_top(base, count)
    if hub is not None:
        return hub
    blocks = backbone_blocks(base)
    chosen = blocks if count is None else blocks[len(blocks) - count:] if count else []
    trainable = {id(layer) for block in chosen for layer in block if not is_batch_norm(layer)}
    base.trainable = True
    names = []
    for layer in base.layers:
        layer.trainable = id(layer) in trainable
        if layer.trainable and layer.weights:
            names.append(layer.name)
    return names
