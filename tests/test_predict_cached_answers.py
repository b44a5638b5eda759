"""predict gives the head's answer on an image's cached row, on the caches the other predict
tests do not use (they read float32 caches): the default float16 cache, a cache of another
interpolation (bicubic), and a format-1.2 cache (Pillow's resize before batching, as written
before format 1.3: its preprocessing has no resizer and its encoding-version says 1.2)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import MINI
from tests.helpers import make_plan, run_cli

VARIANTS = {
    "float16 default": {},
    "bicubic": {"interpolation": "bicubic"},
    "format 1.2, pillow": {"resizer": "pillow"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_predict_gives_the_heads_answer_on_the_cached_row(variant: str, tmp_path: Path) -> None:
    from endtoend.predict import open_predictor, predict_files
    from extract.pipeline import extract_features
    from store.store import Store

    store = Store(tmp_path / "store")
    cache = extract_features(make_plan(MINI, image_size=48, **VARIANTS[variant]), store,
                             progress=False).cache
    assert cache.dtype == "float16"
    if variant.startswith("format 1.2"):
        assert "resizer" not in cache.preprocessing  # the pre-1.3 definition, as stored then
        with h5py.File(cache.path, "r+") as handle:
            handle.attrs["encoding-version"] = "1.2"
        cache = store.find_cache()
        with h5py.File(cache.path, "r") as handle:
            assert handle.attrs["encoding-version"] == "1.2"
    fitted = run_cli("fit", "--head", "logreg", "--store", str(store.root))
    assert fitted.exit_code == 0, fitted.output
    model = open_predictor(store, cache, "logreg")
    assert model.preprocessing.interpolation == VARIANTS[variant].get("interpolation", "bilinear")
    ids = list(cache.ids("test")[:40])
    answers = list(predict_files(model, [Path(cache.source["path"]) / i for i in ids],
                                 top=len(model.class_names), batch_size=16))
    got = np.array([[{t["label"]: t["probability"] for t in a.top}[name]
                     for name in model.class_names] for a in answers])
    want = model.estimator.predict_proba(cache.features("test")[:40])
    # the cache holds float16 rows, predict float32 features: the same answer, close probabilities
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-3)
