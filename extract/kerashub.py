"""KerasHub image backbones (DINOv2, DINOv3, SigLIP/SigLIP2 and CLIP image towers) as headstart
backbones, loaded with KerasHub's own code from a preset name, a handle (kaggle://, hf://) or a
local preset folder.

A preset's identity is the digest of its files (config.json and the weights), never its name; its
preprocessing is the preset's own image converter, stored in the cache (`Preprocessing.converter`)
and rebuilt from there with KerasHub's deserialisation, so every later step resizes and rescales
as the converter does. Vision transformers pool their last layer's tokens as `cls` (the class
token; for SigLIP, which has none, its attention-pooling head), `mean` (of the patch tokens, after
the class and register tokens) or `cls+mean` (both side by side: the DINOv2 linear evaluation's
choice, the default for DINO models). `extract --blocks N` pools each of the last N transformer
layers that way, after the tower's final LayerNorm (`hub_multiblock_model`).

Nothing here imports keras_hub until a preset is downloaded or a model is built, so listing
backbones and commands that do not use KerasHub stay as fast as before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extract.backbone_types import Backbone, Weights
from extract.hub_support import (CONFIG_FILE, IDENTITY_PREFIX, converter_ops, load_keras_hub,
                                  preset_identity, quiet)
from extract.preprocessing import Preprocessing
from extract.runtime import load_keras
from store.errors import HeadstartError
from store.fingerprint import canonical_json
from store.store import expand_path

PRESET_PREFIX = "preset:"
HUB_POOLINGS = ("cls", "mean", "cls+mean")
CONVERTER_FILE = "image_converter.json"


@dataclass(frozen=True)
class Family:
    """How headstart reads one KerasHub backbone class's output."""

    tower: str | None  # attribute holding the image tower (two-tower models), or None
    class_tokens: str  # "one" (a class token first) or "head" (no class token: SigLIP's MAP head)
    resizable: bool  # the preset takes another image_shape (position embeddings interpolated)
    default_pooling: str
    final_norm: str  # attribute holding the tower's LayerNorm after its last transformer layer


FAMILIES = {
    "DINOV2Backbone": Family(None, "one", True, "cls+mean", "layernorm"),
    "DINOV3Backbone": Family(None, "one", True, "cls+mean", "layernorm"),
    "CLIPBackbone": Family("vision_encoder", "one", False, "cls", "layer_norm"),
    "CLIPVisionEncoder": Family(None, "one", False, "cls", "layer_norm"),
    "SigLIPBackbone": Family("vision_encoder", "head", False, "cls", "post_layer_norm"),
    "SigLIPVisionEncoder": Family(None, "head", False, "cls", "post_layer_norm"),
}


@dataclass(frozen=True)
class HubBackbone(Backbone):
    """A KerasHub preset; `location` (its local folder) is set once it is resolved."""

    preset: str = ""  # a built-in preset name, a kaggle:// or hf:// handle, or a folder
    source: str = ""  # where the weights come from, as `backbones` lists it
    family: str = ""  # the backbone class name (a key of FAMILIES)
    patch_size: int = 0
    register_tokens: int = 0
    location: str = ""  # the local preset folder (empty until resolved)
    converter_json: str = ""  # the preset's image converter, serialised by Keras

    @property
    def poolings(self) -> tuple[str, ...]:
        return HUB_POOLINGS

    @property
    def default_pooling(self) -> str:
        return FAMILIES[self.family].default_pooling if self.family in FAMILIES else "cls"

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens: the class token, then the register tokens."""
        return (1 if FAMILIES[self.family].class_tokens == "one" else 0) + self.register_tokens

    def resolved(self) -> "HubBackbone":
        """This preset with its local folder (downloaded by KerasHub if needed)."""
        if self.location:
            return self
        folder = _download(self.preset)
        return read_preset(folder, self.name, self.preset, self.source)

    def preprocessing(self, image_size: int, interpolation: str = "bilinear",
                      resizer: str = "tensorflow") -> Preprocessing:
        """The preset's image converter at `image_size` (interpolation and resizer are the
        converter's own; the arguments of keras.applications backbones are ignored)."""
        if not self.converter_json:  # a named preset: its converter comes with the download
            return self.resolved().preprocessing(image_size, interpolation, resizer)
        converter = json.loads(self.converter_json)
        config = converter["config"]
        config["image_size"] = [image_size, image_size]
        return Preprocessing(
            image_size=image_size,
            preprocess_input=f"keras_hub.layers.{converter['class_name']}",
            interpolation=str(config.get("interpolation", "bilinear")),
            resizer="keras_hub",
            converter=converter,
        )

    def check(self, alpha: float | None, image_size: int, pooling: str) -> None:
        """Refuse what this preset cannot do, in one sentence."""
        self.check_pooling(pooling)
        if alpha is not None:
            raise HeadstartError(f"Backbone {self.name} takes no --alpha.")
        if not self.location:
            return  # checked again once resolved
        if image_size % self.patch_size:
            low = max(self.patch_size, image_size // self.patch_size * self.patch_size)
            raise HeadstartError(
                f"--image-size must be a multiple of {self.name}'s patch size {self.patch_size}; "
                f"got {image_size} (try {low} or {low + self.patch_size}).")
        if not FAMILIES[self.family].resizable and image_size != self.native_size:
            raise HeadstartError(f"Backbone {self.name} runs at its own size only: --image-size "
                                 f"{self.native_size}; got {image_size}.")
        if image_size > 1024:
            raise HeadstartError(f"--image-size must be at most 1024; got {image_size}.")

    def weights(self, weights: Weights) -> Weights:
        return self.preset_weights(weights)

    def preset_weights(self, weights: Weights) -> Weights:
        """The preset's own weights; --weights other than the default is refused."""
        if weights.source == "preset":
            return weights
        if weights.source != "imagenet":
            raise HeadstartError(
                f"Backbone {self.name} is a KerasHub preset and carries its own weights; drop "
                "--weights (for other weights, save them as a preset folder and pass "
                "--backbone preset:DIR).")
        return Weights("preset", Path(self.location))


# --- the registry's named presets (nothing is downloaded until one is used) ------------------

def _named(name: str, family: str, patch: int, width: int, registers: int = 0, size: int = 224,
           preset: str | None = None, hub: str = "") -> HubBackbone:
    preset = preset or name
    return HubBackbone(name, "keras_hub", family, size, patch, width, preset=preset,
                       source=f"KerasHub preset {preset} (Kaggle {hub or 'keras'})",
                       family=family, patch_size=patch, register_tokens=registers)


NAMED_PRESETS = (
    _named("dinov2_small", "DINOV2Backbone", 14, 384, hub="keras/dinov2"),
    _named("dinov2_base", "DINOV2Backbone", 14, 768, hub="keras/dinov2"),
    _named("dinov2_large", "DINOV2Backbone", 14, 1024, hub="keras/dinov2"),
    _named("dinov2_with_registers_small", "DINOV2Backbone", 14, 384, 4, hub="keras/dinov2"),
    _named("dinov2_with_registers_base", "DINOV2Backbone", 14, 768, 4, hub="keras/dinov2"),
    _named("dinov2_with_registers_large", "DINOV2Backbone", 14, 1024, 4, hub="keras/dinov2"),
    _named("dinov3_small", "DINOV3Backbone", 16, 384, 4, preset="dinov3_vit_small_lvd1689m",
           hub="keras/dinov3"),
    _named("dinov3_small_plus", "DINOV3Backbone", 16, 384, 4,
           preset="dinov3_vit_small_plus_lvd1689m", hub="keras/dinov3"),
    _named("dinov3_base", "DINOV3Backbone", 16, 768, 4, preset="dinov3_vit_base_lvd1689m",
           hub="keras/dinov3"),
    _named("dinov3_large", "DINOV3Backbone", 16, 1024, 4, preset="dinov3_vit_large_lvd1689m",
           hub="keras/dinov3"),
    _named("siglip_base", "SigLIPBackbone", 16, 768, preset="siglip_base_patch16_224",
           hub="keras/siglip"),
    _named("siglip_so400m", "SigLIPBackbone", 14, 1152, preset="siglip_so400m_patch14_224",
           hub="keras/siglip"),
    _named("siglip2_base", "SigLIPBackbone", 16, 768, preset="siglip2_base_patch16_224",
           hub="keras/siglip"),
    _named("siglip2_so400m", "SigLIPBackbone", 14, 1152, preset="siglip2_so400m_patch14_224",
           hub="keras/siglip"),
    _named("clip_base", "CLIPBackbone", 16, 768, preset="clip_vit_base_patch16",
           hub="keras/clip"),
    _named("clip_large", "CLIPBackbone", 14, 1024, preset="clip_vit_large_patch14",
           hub="keras/clip"),
)


def preset_backbone(spec: str) -> HubBackbone:
    """`--backbone preset:SPEC`: a local preset folder (read now), a registered preset (by its
    name or its KerasHub preset name) or any other KerasHub name or handle (resolved later)."""
    spec = spec.strip()
    if not spec:
        raise HeadstartError("--backbone preset: needs a KerasHub preset name, handle or folder.")
    path = expand_path(spec)
    if "://" not in spec and path.is_dir():
        return read_preset(path.resolve(), f"{PRESET_PREFIX}{path.resolve().name}", spec,
                           f"local preset folder {path.resolve()}")
    if "://" not in spec and (os.sep in spec or spec.startswith((".", "~"))):
        raise HeadstartError(f"There is no preset folder {spec!r}; pass a folder saved with "
                             "KerasHub's save_to_preset, or a preset name or handle.")
    for named in NAMED_PRESETS:
        if spec in (named.name, named.preset):
            return named
    return HubBackbone(f"{PRESET_PREFIX}{spec}", "keras_hub", "", 0, 1, 0, preset=spec,
                       source=f"KerasHub preset {spec}")


def read_preset(folder: Path, name: str, preset: str, source: str) -> HubBackbone:
    """A resolved backbone from a local preset folder (its JSON files only; no Keras)."""
    folder = Path(folder)
    config = _json(folder / CONFIG_FILE, folder)
    family = str(config.get("class_name", ""))
    if family not in FAMILIES:
        known = ", ".join(FAMILIES)
        raise HeadstartError(
            f"The preset {preset} holds a {family or 'non-Keras'} model; headstart reads the "
            f"image backbones {known} (a preset saved in KerasHub's format).")
    if not (folder / CONVERTER_FILE).is_file():
        raise HeadstartError(f"The preset {preset} has no image converter ({CONVERTER_FILE}); "
                             "save one beside the backbone with the converter's save_to_preset.")
    converter = _json(folder / CONVERTER_FILE, folder)
    settings = config.get("config", {})
    tower = FAMILIES[family].tower
    if tower:
        settings = settings.get(tower, {}).get("config", {})
    size = (converter.get("config", {}).get("image_size") or [0])[0]
    try:
        patch, width = int(settings["patch_size"]), int(settings["hidden_dim"])
        size = int(size or settings["image_shape"][0])
    except (KeyError, TypeError, ValueError, IndexError):
        raise HeadstartError(f"The preset {preset}'s config.json does not give its patch size, "
                             "width and image size; save the preset again with KerasHub.") from None
    return HubBackbone(name, "keras_hub", family, size, patch, width, preset=preset, source=source,
                       family=family, patch_size=patch,
                       register_tokens=int(settings.get("num_register_tokens", 0) or 0),
                       location=str(folder), converter_json=canonical_json(converter))


def preset_at(folder: Path, name: str) -> HubBackbone:
    """The backbone of a cache made from the preset in `folder` (see `cache_preset_weights`)."""
    return read_preset(Path(folder), name, str(folder), f"local preset folder {folder}")


def _json(path: Path, folder: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HeadstartError(f"{folder} is not a KerasHub preset folder (no {path.name}); pass "
                             "a folder saved with save_to_preset.") from None
    except (OSError, ValueError) as error:
        raise HeadstartError(f"Cannot read {path} ({error}); save the preset again.") from None


def cache_preset_weights(cache: Any, override: str | None) -> Weights:
    """The preset a cache was extracted with (`override`: the folder, when it moved), checked
    against the digest its fingerprint recorded."""
    identity = str(cache.inputs["weights"])
    folder = override or cache.weights_path
    if not folder or not Path(folder).is_dir():
        raise HeadstartError(
            f"Cache {cache.name} was made with the KerasHub preset folder {folder}, which is "
            "gone; pass the same preset folder with --weights DIR.")
    path = Path(folder).resolve()
    if not (path / CONFIG_FILE).is_file() or preset_identity(path) != identity:
        raise HeadstartError(
            f"The preset folder {folder} is not the one cache {cache.name} was extracted with "
            f"(its digest differs from {identity[len(IDENTITY_PREFIX):][:16]}...); pass the "
            "original preset folder with --weights DIR.")
    return Weights("preset", path)


# --- KerasHub itself -----------------------------------------------------------------------------

def _download(preset: str) -> Path:
    """The local folder of a named or handled preset, downloaded by KerasHub's own code."""
    load_keras_hub()
    from keras_hub.src.utils import preset_utils

    try:
        with quiet():
            config = preset_utils.get_file(preset, CONFIG_FILE)
            folder = Path(config).parent
            for name in (CONVERTER_FILE, preset_utils.MODEL_WEIGHTS_FILE,
                         preset_utils.SHARDED_MODEL_WEIGHTS_CONFIG_FILE):
                if preset_utils.check_file_exists(preset, name):
                    preset_utils.get_file(preset, name)
            index = folder / preset_utils.SHARDED_MODEL_WEIGHTS_CONFIG_FILE
            if index.is_file():  # sharded weights: every shard the index names
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    preset_utils.get_file(preset, shard)
    except Exception as error:  # requests, kagglehub and huggingface_hub raise their own kinds
        raise HeadstartError(
            f"Could not download the KerasHub preset {preset!r} ({_cause(error)}); "
            "offline, download it where there is a network (keras_hub.models.Backbone"
            ".from_preset(...).save_to_preset(DIR), and the image converter's save_to_preset(DIR)) "
            "and pass the folder with --backbone preset:DIR.") from None
    return folder


def _cause(error: BaseException) -> str:
    """A download failure's reason, short: no network, or the library's first line."""
    text = str(error)
    if isinstance(error, OSError) and any(
            word in text for word in ("Max retries", "NameResolution", "Connection", "resolve")):
        return "no network connection"
    return _first_line(error).split(" (Caused by")[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".")[:200] if text else type(error).__name__


def build_hub_feature_model(backbone: HubBackbone, weights: Weights, image_size: int,
                            pooling: str) -> Any:
    """The frozen feature model: converter-preprocessed S×S×3 images in, pooled tokens out."""
    hub = load_keras_hub()
    backbone = backbone.resolved()
    backbone.check(None, image_size, pooling)
    if weights.source != "preset" or weights.path is None:
        weights = backbone.preset_weights(weights)
    family = FAMILIES[backbone.family]
    kwargs: dict[str, Any] = {"image_shape": (image_size, image_size, 3)} if family.resizable else {}
    try:
        with quiet():
            model = hub.models.Backbone.from_preset(str(weights.path), **kwargs)
    except HeadstartError:
        raise
    except Exception as error:
        raise HeadstartError(f"Cannot load the KerasHub preset {weights.path} "
                             f"({_first_line(error)}); save it again with save_to_preset.") from None
    tower = getattr(model, family.tower) if family.tower else model
    tower.trainable = False
    return _pooled_model(tower, backbone, image_size, pooling, 1)[0]


def hub_multiblock_model(feature_model: Any, count: int, pooling: str
                         ) -> tuple[Any, list[tuple[str, int]]] | None:
    """`extract --blocks N` on a KerasHub feature model (from `build_hub_feature_model`): one
    model computing the last N transformer layers' outputs, each put through the tower's final
    LayerNorm (as DINOv2's linear evaluation does; SigLIP's `cls` also through its attention-
    pooling head) and reduced with `pooling` as the last layer is, concatenated bottom to top,
    and each block's name (its transformer layer's) and width. The last block is computed
    from the tower's own output as the one-block model computes it (the same numbers, bit for
    bit); `count == 1` returns `feature_model` itself. None for a model that is not a KerasHub
    one."""
    tower = feature_model.__dict__.get(_TOWER)
    if tower is None:
        return None
    backbone = feature_model.__dict__[_BACKBONE]
    if count == 1:
        layers = transformer_layers(tower)
        return feature_model, [(_block_name(tower, layers[-1]) if layers else "output",
                                int(feature_model.output_shape[-1]))]
    return _pooled_model(tower, backbone, int(feature_model.input_shape[1]), pooling, count)


def _pooled_model(tower: Any, backbone: HubBackbone, image_size: int, pooling: str,
                  count: int) -> tuple[Any, list[tuple[str, int]]]:
    """The feature model of the last `count` transformer layers of `tower` (see
    `hub_multiblock_model`), and each block's name and width."""
    keras = load_keras()
    ops = keras.ops
    family = FAMILIES[backbone.family]
    layers = transformer_layers(tower)
    if count > 1 and count > len(layers):  # one block is the tower's output: no layers needed
        raise HeadstartError(f"--blocks must be between 1 and {len(layers)} for backbone "
                             f"{backbone.name} (its transformer layers); got {count}.")
    images = keras.Input((image_size, image_size, 3), name="images")
    name = backbone.name.replace(PRESET_PREFIX, "preset_").replace("/", "_").replace(":", "_")
    name = f"{name}_{pooling.replace('+', '_')}"
    if count == 1:  # today's model, untouched
        if family.class_tokens == "head":  # SigLIP: the head's attention pooling is its summary
            inner = keras.Model(tower.inputs, [tower.post_layer_norm.output, tower.output])
            sequence, summary = inner(_fed(tower, images))
        else:
            sequence, summary = tower(_fed(tower, images)), None
        features = _reduce(ops, pooling, *_summary_and_patches(sequence, summary, backbone))
        widths = [int(features.shape[-1])]
    else:
        # Every tensor of the tower's own graph is read before the final norm (and head) are
        # called again: the last block is the tower's own output.
        norm = getattr(tower, family.final_norm)
        raw, normed = _layer_outputs(tower, len(layers))
        head = family.class_tokens == "head"
        last = [_own_output(tower.post_layer_norm), tower.output] if head else [tower.output]
        outputs = []
        for tensor in raw[len(raw) - count:-1]:
            sequence = tensor if normed else norm(tensor)
            outputs += [sequence, tower.head(sequence)] if head else [sequence]
        inner = keras.Model(tower.inputs, outputs + last, name=f"{tower.name}_layers")
        results = inner(images)
        step = 2 if head else 1
        pooled = [_reduce(ops, pooling, *_summary_and_patches(
            results[k * step], results[k * step + 1] if head else None, backbone))
            for k in range(count)]
        widths = [int(p.shape[-1]) for p in pooled]
        features = keras.layers.Concatenate(axis=-1, name="blocks_concat")(pooled)
        name = f"{name}_blocks{count}"
    feature_model = keras.Model(images, features, name=name)
    feature_model.trainable = False
    feature_model.__dict__[_TOWER] = tower  # for finetune and --blocks (not tracked attributes)
    feature_model.__dict__[_BACKBONE] = backbone
    names = [_block_name(tower, layer) for layer in layers[len(layers) - count:]]
    return feature_model, list(zip(names, widths))


def _fed(tower: Any, images: Any) -> Any:
    """`images` as the tower takes them: under its own input's name (DINOv2, CLIP and SigLIP
    call it `images`, DINOv3 `pixel_values`)."""
    named = tower.input
    return {key: images for key in named} if isinstance(named, dict) else images


def _summary_and_patches(sequence: Any, summary: Any, backbone: HubBackbone) -> tuple[Any, Any]:
    """A layer's (summary, patch tokens): the head's output and every token for a tower with a
    pooling head (`summary` given: SigLIP), else the class token and the tokens after the class
    and register tokens."""
    if summary is not None:
        return summary, sequence
    return sequence[:, 0, :], sequence[:, backbone.prefix_tokens:, :]


def _reduce(ops: Any, pooling: str, summary: Any, patches: Any) -> Any:
    """One block's features: its summary (class token or head), its patch mean, or both."""
    if pooling == "cls":
        return summary
    if pooling == "mean":
        return ops.mean(patches, axis=1)
    return ops.concatenate([summary, ops.mean(patches, axis=1)], axis=-1)


def _layer_outputs(tower: Any, count: int) -> tuple[list[Any], bool]:
    """The output of each of the tower's `count` transformer layers as tensors of its own graph,
    bottom to top, and whether they already went through its final norm (a DINO tower built
    with apply_layernorm). DINO towers run their layers inside one encoder layer, whose outputs
    the tower keeps as `pyramid_outputs` (stage1..stageN); CLIP and SigLIP call each layer in
    the tower's graph."""
    pyramid = getattr(tower, "pyramid_outputs", None)
    if pyramid:
        return ([pyramid[f"stage{i}"] for i in range(1, count + 1)],
                bool(getattr(tower, "apply_layernorm", False)))
    return [_own_output(layer) for layer in transformer_layers(tower)], False


def _block_name(tower: Any, layer: Any) -> str:
    """A transformer layer's block name: its layer name without the tower's prefix
    (DINOv2 `layers_11`, CLIP and SigLIP `encoder_block_11`)."""
    prefix = f"{tower.name}_"
    return layer.name[len(prefix):] if layer.name.startswith(prefix) else layer.name


def _own_output(layer: Any) -> Any:
    """A layer's output in the graph of the tower that it was built in (its first call)."""
    return layer._inbound_nodes[0].output_tensors[0]


_TOWER = "_headstart_kerashub_tower"
_BACKBONE = "_headstart_kerashub_backbone"


def transformer_layers(tower: Any) -> list[Any]:
    """The transformer layers of a KerasHub image tower, bottom to top."""
    encoder = getattr(tower, "encoder", None)
    return list(getattr(tower, "encoder_layers", None) or getattr(encoder, "layers", None) or [])


def unfreeze_hub_top(feature_model: Any, count: int | None) -> list[str] | None:
    """finetune --unfreeze N on a KerasHub feature model: the last N transformer layers (all
    with None) become trainable, their LayerNorms kept as they are (frozen), and so does
    everything else (embeddings, final norm). None for a model that is not a KerasHub one."""
    tower = feature_model.__dict__.get(_TOWER)
    if tower is None:
        return None
    keras = load_keras()
    blocks = transformer_layers(tower)
    chosen = blocks if count is None else blocks[len(blocks) - count:] if count else []
    inside = {id(layer) for block in chosen for layer in block._flatten_layers(include_self=True)}
    feature_model.trainable = True
    for layer in tower._flatten_layers(include_self=False):
        owns = bool(layer._trainable_variables or layer._non_trainable_variables)
        if isinstance(layer, keras.layers.LayerNormalization) or (owns and id(layer) not in inside):
            layer.trainable = False
    return [block.name for block in chosen]


def save_finetuned_preset(feature_model: Any, preprocessing: Preprocessing,
                          folder: Path) -> Weights | None:
    """Save a fine-tuned KerasHub tower and the cache's converter as a preset folder (what the
    refreshed cache is extracted with); None for a model that is not a KerasHub one."""
    tower = feature_model.__dict__.get(_TOWER)
    if tower is None or preprocessing.converter is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    with quiet():
        tower.save_to_preset(str(folder))
        converter_ops(preprocessing.converter).converter.save_to_preset(str(folder))
    return Weights("preset", folder.resolve())


def converter_layer(preprocessing: Preprocessing, resize: bool = True) -> Any:
    """The stored converter as a layer of an exported model: resize and rescale (pixels of any
    size; the resize of float pixels is not rounded), or only the rescale (inputs already at
    the input size)."""
    assert preprocessing.converter is not None
    ops = converter_ops(preprocessing.converter)
    return ops.converter if resize else ops.rescaler


def register_for_loading(path: Path) -> None:
    """Import KerasHub (registering its layers) before loading a .keras file that uses them."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            uses = b"keras_hub" in archive.read("config.json")
    except (OSError, KeyError, zipfile.BadZipFile):
        return
    if uses:
        load_keras_hub()
