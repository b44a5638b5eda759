"""The settings of one `extract` run as plain values: sent to shard workers, turned into plans."""

from __future__ import annotations

from dataclasses import dataclass

from extract.backbones import Weights, get_backbone
from extract.datasets import Dataset, open_dataset
from extract.compute import ComputeOptions
from extract.plan import ExtractionPlan
from store.shards import ShardSpec


@dataclass(frozen=True)
class ExtractSettings:
    """What `extract` was asked for (picklable: a Ray task or another process rebuilds the plan)."""

    dataset: str
    backbone: str = "vgg16"
    weights: str = "imagenet"
    alpha: float | None = None
    image_size: int | None = None
    pooling: str | None = None  # None: the backbone's default (avg; cls+mean for DINO models)
    dtype: str = "float16"
    batch_size: int = 64
    test_fraction: float = 0.2
    workers: int = 4
    distribute: bool = False  # MirroredStrategy over every visible GPU (no-op with one device)
    precision: str = "float32"
    xla: bool = False
    blocks: int = 1  # the last N blocks of the backbone, side by side
    tta: str | None = None  # "flip": also cache the mirrored view of every image
    runtime: str = "tf"  # "onnx": the backbone on ONNX Runtime (CPU)

    def open_dataset(self) -> Dataset:
        """The dataset, listed (cheap: no file is read)."""
        return open_dataset(self.dataset, self.test_fraction)

    def plan(self, shard: ShardSpec | None = None, dataset: Dataset | None = None) -> ExtractionPlan:
        """The extraction plan of the whole dataset, or of one shard of it."""
        dataset = dataset or self.open_dataset()
        spec = get_backbone(self.backbone)
        spec.check_pooling(self.pooling)  # before a KerasHub preset is downloaded
        spec = spec.resolved()
        return ExtractionPlan(
            dataset=dataset.sharded(shard) if shard else dataset,
            backbone=spec,
            weights=spec.weights(Weights.parse(self.weights)),
            image_size=spec.native_size if self.image_size is None else self.image_size,
            pooling=self.pooling or spec.default_pooling,
            alpha=self.alpha,
            dtype=self.dtype,
            batch_size=self.batch_size,
            workers=self.workers,
            compute=ComputeOptions(self.precision, self.xla, self.distribute, runtime=self.runtime),
            blocks=self.blocks,
            tta=self.tta,
        )
