"""Model files that would run code when loaded are refused before anything runs.

Each exploit is first shown to be real (loading it the unsafe way does run it), then loaded the
way headstart loads heads, which refuses it and leaves no marker behind.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import joblib
import pytest
from typer.testing import CliRunner

from classifiers.saved import load_saved_head
from cli import app
from store.errors import HeadstartError
from store.fingerprint import digest_file
from store.store import Store


class Exploit:
    """Unpickling this writes a marker file: arbitrary code would run the same way."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran while loading"))


@pytest.fixture
def store(fitted_store: tuple, tmp_path: Path) -> Store:
    copy = tmp_path / "store"
    shutil.copytree(fitted_store[0], copy)
    return Store(copy)


class Settable:
    """Building this from a file runs code (its __setstate__ writes a marker)."""

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("code ran while loading")


def test_crafted_skops_file_with_a_matching_sidecar_is_refused(store: Store,
                                                                tmp_path: Path) -> None:
    """Even when the sidecar is forged too (a copied store), a skops head cannot run code."""
    import skops.io

    marker = tmp_path / "marker"
    payload = Settable()
    payload.__dict__["marker"] = str(marker)
    control = tmp_path / "control.skops"
    skops.io.dump(payload, control)
    skops.io.load(control, trusted=skops.io.get_untrusted_types(file=control))  # trusting it runs it
    assert marker.exists()
    marker.unlink()

    sidecar, record = sidecar_of(store)
    assert record["file"].endswith(".skops")
    model = sidecar.parent / record["file"]
    shutil.copy(control, model)
    sidecar.write_text(json.dumps({**record, "sha256": digest_file(model)}))  # forged to match
    with pytest.raises(HeadstartError, match="types headstart does not trust"):
        load_saved_head(store, store.find_cache(), "logreg")
    model.write_bytes(b"PK\x03\x04 not really a zip")
    sidecar.write_text(json.dumps({**record, "sha256": digest_file(model)}))
    with pytest.raises(HeadstartError, match="not a readable skops file"):
        load_saved_head(store, store.find_cache(), "logreg")
    assert not marker.exists()


def test_every_scikit_learn_head_round_trips_through_skops(tmp_path: Path) -> None:
    import numpy as np

    from classifiers.persistence import load_sklearn_file
    from classifiers.registry import HEADS

    import skops.io

    rng = np.random.default_rng(0)
    X, y = rng.random((120, 8)).astype(np.float32), np.arange(120) % 3
    for kind in HEADS.values():
        if kind.file_format == "keras":
            continue
        estimator = kind.create({}).fit(X, y)
        path = tmp_path / f"{kind.name}.skops"
        skops.io.dump(estimator, path)
        loaded = load_sklearn_file(path, kind.name)
        assert np.array_equal(loaded.predict_proba(X), estimator.predict_proba(X)), kind.name


def sidecar_of(store: Store, name: str = "logreg") -> tuple[Path, dict]:
    path = next(store.heads_dir.glob(f"*/{name}.json"))
    return path, json.loads(path.read_text())


def test_crafted_pickle_is_refused_before_it_runs(store: Store, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    control = tmp_path / "control.joblib"
    joblib.dump(Exploit(marker), control)
    joblib.load(control)  # the exploit is real: a plain load runs it
    assert marker.read_text() == "code ran while loading"
    marker.unlink()

    sidecar, record = sidecar_of(store)
    model = sidecar.parent / record["file"]
    joblib.dump(Exploit(marker), model)  # swapped in under the recorded name
    cache = store.find_cache()
    with pytest.raises(HeadstartError, match="does not match its recorded SHA-256"):
        load_saved_head(store, cache, "logreg")
    result = CliRunner().invoke(app, ["evaluate", "--head", "logreg", "--store", str(store.root)])
    assert result.exit_code == 1 and "refusing to load it" in result.output
    assert not marker.exists()  # nothing ran


def test_sidecar_cannot_point_outside_the_store_or_through_a_link(store: Store,
                                                                  tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.joblib"
    joblib.dump(Exploit(marker), evil)
    sidecar, record = sidecar_of(store)
    cache = store.find_cache()
    for file_name in (str(evil), "../../../" + evil.name):
        sidecar.write_text(json.dumps({**record, "file": file_name, "sha256": digest_file(evil)}))
        with pytest.raises(HeadstartError, match="missing or does not match"):
            load_saved_head(store, cache, "logreg")
    link = sidecar.parent / "logreg.linked.joblib"
    link.symlink_to(evil)
    sidecar.write_text(json.dumps({**record, "file": link.name, "sha256": digest_file(evil)}))
    with pytest.raises(HeadstartError, match="symbolic link"):
        load_saved_head(store, cache, "logreg")
    assert not marker.exists()


def test_keras_head_with_a_python_lambda_is_refused(store: Store, tmp_path: Path) -> None:
    from extract.runtime import load_keras

    keras = load_keras()
    marker = tmp_path / "marker"
    code = f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]"
    inputs = keras.Input((256,))
    outputs = keras.layers.Dense(10, activation="softmax")(
        keras.layers.Lambda(eval(code))(inputs))  # noqa: S307 - the test's own lambda
    model_file = tmp_path / "lambda.keras"
    keras.Model(inputs, outputs).save(model_file)
    marker.unlink()  # building the model ran the lambda once; from here on nothing may
    keras.saving.load_model(model_file, safe_mode=False)  # the unsafe way runs it
    assert marker.exists()
    marker.unlink()

    cache = store.find_cache()
    folder = store.head_dir(cache)
    target = folder / f"mlp.{digest_file(model_file)[:12]}.keras"
    shutil.copy(model_file, target)
    _, logreg = sidecar_of(store)
    (folder / "mlp.json").write_text(json.dumps({
        **logreg, "name": "mlp", "kind": "mlp", "options": {}, "file": target.name,
        "sha256": digest_file(target),
        "state": {"classes_": list(range(10)), "n_features_in_": 256, "history_": {}}}))
    with pytest.raises(HeadstartError, match="safe_mode"):
        load_saved_head(store, cache, "mlp")
    assert not marker.exists()


def test_pickle_protocol_is_not_reachable_through_sidecars(store: Store) -> None:
    """Sidecars are JSON: a pickle in a sidecar is an unreadable sidecar, never unpickled."""
    sidecar, _ = sidecar_of(store)
    sidecar.write_bytes(pickle.dumps({"format": "headstart.head"}))
    with pytest.raises(HeadstartError, match="Cannot read"):
        load_saved_head(store, store.find_cache(), "logreg")
