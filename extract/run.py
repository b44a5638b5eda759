"""One `extract` request, whatever the engine: the cache, its augmented views, or a shard."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from extract.augment import Augmentation
from extract.pipeline import ExtractionResult, extract_features, extract_views
from extract.settings import ExtractSettings
from store.cache import FeatureCache
from store.errors import HeadstartError, command
from store.shards import ShardSpec
from store.store import Store

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ExtractRequest:
    """What `extract` was asked to make."""

    settings: ExtractSettings
    engine: str = "local"
    shard: str | None = None  # "i/N": only that shard
    augmentation: Augmentation | None = None
    views: int = 0  # augmented views of every training image
    ray: Any = None  # extract.ray_engine.RayOptions for engine "ray"
    name: str | None = None  # a name for the cache (see Store.name_cache)


@dataclass
class ExtractOutcome:
    """What an extract request did: the cache (or shard file) and how it was made."""

    cache: FeatureCache
    reused: bool
    computed: int = 0
    seconds: float = 0.0
    shard: ShardSpec | None = None
    views: list[ExtractionResult] = field(default_factory=list)
    augmentation: Augmentation | None = None  # the views' settings
    ray: Any = None  # extract.ray_engine.RayRun when Ray made it

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0

    @property
    def skipped(self) -> list[dict[str, str]]:
        return self.cache.skipped

    def lines(self, store: Store) -> list[str]:
        """What was made or reused, and where it went, as the CLI prints it."""
        cache, run = self.cache, self.ray
        if run is not None and not self.reused:
            hosts = sorted({s.get("host", "?") for s in run.shards})
            return [f"Extracted {self.computed} images in {run.count} shards on Ray "
                    f"({len(hosts)} host(s)) in {run.seconds:.1f} s; merged in "
                    f"{run.merge.seconds:.1f} s.", *run.merge.lines()]
        lines = [f"Reused cache {cache.name} ({cache.short_id}): no backbone pass needed."
                 if self.reused else f"Extracted {self.computed} images in {self.seconds:.1f} s "
                 f"({self.images_per_second:.0f} images/s)."]
        rows = ", ".join(f"{n} {r}" for n, r in cache.split_sizes.items())
        extra = (f", {len(cache.blocks)} blocks ({', '.join(b[0] for b in cache.blocks)})"
                 if len(cache.blocks) > 1 else "")
        extra += ", each with its mirrored view" if cache.tta else ""
        lines.append(f"Features: {rows} rows x {cache.width} ({cache.dtype}){extra}.")
        skipped = self.skipped
        if skipped:
            lines.append(f"Skipped {len(skipped)} unusable files:")
            lines += [f"  {item['id']} ({item['split']}): {item['reason']}" for item in skipped[:20]]
            if len(skipped) > 20:
                lines.append(f"  ... and {len(skipped) - 20} more (all listed in the cache).")
        if cache.kind == "shard":
            lines.append(f"Shard {self.shard} written to {cache.path}; when all "
                         f"{self.shard.count} shards are done: "
                         f"{command(f'merge --store {store.root}')}")
        else:
            lines.append(f"Cache {'reused from' if self.reused else 'written to'} {cache.path}")
        if self.views:
            made = sum(not v.reused for v in self.views)
            lines.append(f"Augmented views: {len(self.views)} of every training image ({made} "
                         f"computed now, {len(self.views) - made} reused), settings "
                         f"{self.augmentation.key}; written to {store.caches_dir} "
                         "(one file per view).")
        return lines


def run_extract(request: ExtractRequest, store: Store, progress: bool = True,
                announce: Callable[[str], None] = lambda line: None) -> ExtractOutcome:
    """Make (or reuse) what `request` asks for, and name it if asked; `announce` hears the
    dataset's summary first."""
    if request.name is not None:
        if request.shard:
            raise HeadstartError("A shard is not a cache; name the merged cache instead.")
        store.check_cache_name(request.name)  # before any work
    outcome = _make(request, store, progress, announce)
    if request.name is not None:
        store.name_cache(outcome.cache, request.name)
    return outcome


def _make(request: ExtractRequest, store: Store, progress: bool,
          announce: Callable[[str], None]) -> ExtractOutcome:
    if request.engine not in ENGINES:
        raise HeadstartError(f"Unknown engine {request.engine!r}; choose one of {', '.join(ENGINES)}.")
    if request.engine == "ray":
        if request.shard or request.augmentation:
            raise HeadstartError("The Ray engine makes every shard itself and does not make "
                                 "augmented views; drop --shard and --augment.")
        return _on_ray(request, store, progress)
    spec = ShardSpec.parse(request.shard) if request.shard else None
    plan = request.settings.plan(spec)
    view_plans = (plan.view_plans(request.augmentation, request.views)  # refused early if wrong
                  if request.augmentation else [])
    sizes = ", ".join(f"{len(s)} {n}" for n, s in plan.dataset.splits.items())
    part = f" (shard {spec} of it)" if spec else ""
    announce(f"Dataset {plan.dataset.name}{part}: {len(plan.dataset.class_names)} classes, "
             f"{sizes} images.")
    if request.name is not None:
        store.check_cache_name(request.name, plan.fingerprint)
    result = extract_features(plan, store, progress)
    views = (extract_views(plan, request.augmentation, request.views, store, progress)
             if view_plans else [])
    return ExtractOutcome(result.cache, result.reused, result.computed, result.seconds, spec, views,
                          request.augmentation)


def _on_ray(request: ExtractRequest, store: Store, progress: bool) -> ExtractOutcome:
    from extract.ray_engine import RayOptions, extract_on_ray

    run = extract_on_ray(request.settings, store, request.ray or RayOptions(), progress)
    if run.merge is None:
        return ExtractOutcome(run.reused, reused=True, ray=run)
    computed = sum(s.get("computed", 0) for s in run.shards)
    return ExtractOutcome(run.merge.cache, False, computed, run.seconds, ray=run)
