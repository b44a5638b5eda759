"""The command line in-process: the whole path end to end, and every error as one sentence."""

from __future__ import annotations

import json
import os
import socket
import urllib.error
from pathlib import Path

import pytest

from tests.conftest import MINI, MINI_ARGS, WEIGHTS
from tests.helpers import assert_clean_error, copy_store, make_folder, run_cli, snapshot
from store.store import Store


def _printed_path(output: str, prefix: str) -> Path:
    (line,) = [line for line in output.splitlines() if line.startswith(prefix)]
    path = Path(line.removeprefix(prefix).strip())
    assert path.exists(), line
    return path


def test_extract_says_what_it_did_and_where(tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ["extract", str(MINI), *MINI_ARGS[:-3], "--image-size", "32", "--quiet",
            "--store", str(store)]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    assert "Dataset cifar10-mini: 10 classes, 400 train, 200 test images." in first.output
    assert "Extracted 600 images in" in first.output and "images/s" in first.output
    assert "Features: train 400, test 200 rows x 256 (float16)." in first.output
    cache_path = _printed_path(first.output, "Cache written to ")
    assert cache_path.parent == store / "caches" and cache_path.suffix == ".h5"
    again = run_cli(*args)
    assert again.exit_code == 0 and "Reused cache" in again.output
    assert _printed_path(again.output, "Cache reused from ") == cache_path
    assert "Cache written to" not in again.output


def test_store_from_the_environment(tmp_path: Path, mini_store: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADSTART_STORE", str(mini_store))
    result = run_cli("list", "--json")
    assert json.loads(result.output)["store"] == str(mini_store)


def test_end_to_end(fitted_store: tuple[Path, dict]) -> None:
    store, fits = fitted_store
    cache = Store(store).find_cache()
    from classifiers.validation import validation_mask

    held_out = int(validation_mask(cache.ids("train")).sum())
    for head in ("logreg", "mlp"):
        output = fits[head].output
        assert f"Fitting {head} on cache {cache.name} ({cache.short_id}) (256 features)." in output
        assert (f"Fitted {head} (in memory) on {400 - held_out} training rows ({held_out} held out "
                "for validation) in") in output and "test accuracy" in output
        assert _printed_path(output, "Head saved to ") == store / "heads" / \
            cache.fingerprint[:16] / f"{head}.json"

    text = run_cli("evaluate", "--store", str(store))
    assert text.exit_code == 0, text.output
    assert f"Cache {cache.name} ({cache.short_id}), test split:" in text.output
    assert "logreg (logreg): accuracy" in text.output and "mlp (mlp): accuracy" in text.output
    assert "airplane" in text.output and "truck" in text.output

    result = run_cli("evaluate", "--json", "--store", str(store))
    assert result.exit_code == 0, result.output
    reports = json.loads(result.output)
    assert [r["head"] for r in reports] == ["logreg", "mlp"]
    for report in reports:
        assert {"accuracy", "top5_accuracy", "per_class", "confusion_matrix"} <= set(report)
        assert list(report["per_class"]) == cache.class_names
        assert all(row["support"] == 20 for row in report["per_class"].values())
        matrix = report["confusion_matrix"]
        assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
        assert sum(map(sum, matrix)) == 200
        assert sum(matrix[i][i] for i in range(10)) / 200 == pytest.approx(report["accuracy"])
        assert 0.25 < report["accuracy"] <= report["top5_accuracy"] <= 1.0
    one = json.loads(run_cli("evaluate", "--head", "mlp", "--json", "--store", str(store)).output)
    assert [r["head"] for r in one] == ["mlp"]

    listing = run_cli("list", "--store", str(store))
    assert listing.exit_code == 0, listing.output
    assert f"Store {store}" in listing.output
    assert cache.name in listing.output and cache.short_id in listing.output
    assert "400/200" in listing.output and "float16" in listing.output
    data = json.loads(run_cli("list", "--json", "--store", str(store)).output)
    assert data["store"] == str(store) and data["unfinished"] == []
    (summary,) = data["caches"]
    assert summary["rows"] == {"train": 400, "test": 200} and summary["width"] == 256
    assert summary["path"] == str(cache.path) and summary["disk_bytes"] > 400 * 256 * 2
    assert sorted(h["name"] for h in data["heads"]) == ["logreg", "mlp"]
    assert all("test" in h["metrics"] for h in data["heads"])

    backbones = run_cli("backbones")
    assert backbones.exit_code == 0
    for name in ("vgg16", "vgg19", "resnet50", "inception_v3", "mobilenet", "mobilenet_v2",
                 "efficientnet_b0"):
        assert name in backbones.output
    heads = run_cli("heads")
    assert heads.exit_code == 0
    assert "mlp:" in heads.output and "logreg:" in heads.output
    assert "epochs = 10" in heads.output and "dropout = 0.5" in heads.output


def test_cache_selection(tmp_path: Path, mini_store: Path) -> None:
    store = copy_store(mini_store, tmp_path)
    result = run_cli("extract", str(MINI), *MINI_ARGS, "--pooling", "max", "--store", str(store))
    assert result.exit_code == 0, result.output
    first, newest = Store(store).caches()
    fit = run_cli("fit", "--head", "mlp", "-p", "epochs=1", "-q", "--cache", first.short_id,
                  "--store", str(store))
    assert fit.exit_code == 0 and f"on cache {first.name} ({first.short_id})" in fit.output
    # by default: the newest cache, which has no heads yet
    assert_clean_error(run_cli("evaluate", "--store", str(store)), "No heads", newest.name)
    assert run_cli("evaluate", "--cache", first.name, "--store", str(store)).exit_code == 0


# --- errors: one sentence, non-zero exit, no traceback, the store untouched ----------------


@pytest.fixture()
def store(fitted_store: tuple[Path, dict], tmp_path: Path) -> Path:
    return copy_store(fitted_store[0], tmp_path)


@pytest.fixture()
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every Keras download fails as it does without a network, and finds nothing cached."""
    from keras.src.backend import config
    from keras.src.utils import file_utils

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "keras-home"))


MOBILENET = ["--backbone", "mobilenet", "--alpha", "0.25", "--image-size", "64"]
ERRORS = {
    "unknown dataset": (["extract", "imagenet21k"], ["Unknown dataset 'imagenet21k'", "cifar10"]),
    "missing path": (["extract", "/no/such/folder"], ["no such folder"]),
    "unknown backbone": (["extract", str(MINI), "--backbone", "vgg99"],
                         ["Unknown backbone 'vgg99'", "vgg16", "mobilenet"]),
    "missing weights file": (["extract", str(MINI), *MOBILENET, "--weights", "/no/such.h5"],
                             ["does not exist"]),
    "weights of another backbone": (["extract", str(MINI), "--backbone", "vgg16", "--weights",
                                     str(WEIGHTS), "--image-size", "32"],
                                    ["does not fit backbone vgg16"]),
    "weights of another alpha": (["extract", str(MINI), "--backbone", "mobilenet", "--alpha", "0.5",
                                  "--weights", str(WEIGHTS), "--image-size", "64"],
                                 ["does not fit backbone mobilenet (alpha 0.5)"]),
    "alpha for vgg": (["extract", str(MINI), "--backbone", "vgg16", "--alpha", "0.5"],
                      ["takes no --alpha"]),
    "image too small": (["extract", str(MINI), "--backbone", "inception_v3", "--image-size", "32"],
                        ["at least 75"]),
    "unknown head": (["fit", "--head", "forest"], ["Unknown head 'forest'", "mlp", "logreg"]),
    "unknown option": (["fit", "--head", "mlp", "-p", "depth=3"],
                       ["no option 'depth'", "epochs"]),
    "option without value": (["fit", "--head", "mlp", "-p", "epochs"], ["KEY=VALUE"]),
    "option of the wrong type": (["fit", "--head", "mlp", "-p", "epochs=many"],
                                 ["epochs='many'", "int"]),
    "bad hidden sizes": (["fit", "--head", "mlp", "-p", "hidden=256,big"],
                         ["comma-separated ints"]),
    # --replace: the store has these heads, and the option, not the name, is what is wrong
    "option out of range": (["fit", "--head", "mlp", "-p", "dropout=1.5", "--replace"], ["dropout"]),
    "unknown schedule": (["fit", "--head", "mlp", "-p", "lr_schedule=warp", "--replace"], ["lr_schedule"]),
    "negative C": (["fit", "--head", "logreg", "-p", "C=-1", "--replace"], ["C"]),
    "unknown cache": (["evaluate", "--cache", "feedbeef"], ["No cache matches 'feedbeef'"]),
    "unknown head name": (["evaluate", "--head", "forest"], ["No head named 'forest'"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_sentence_and_change_nothing(store: Path, case: str) -> None:
    args, fragments = ERRORS[case]
    before = snapshot(store)
    result = run_cli(*args, "--store", str(store))
    assert_clean_error(result, *fragments)
    assert snapshot(store) == before


def test_keras_dataset_download_failing_offline(store: Path, offline: None) -> None:
    before = snapshot(store)
    result = run_cli("extract", "cifar10", *MOBILENET, "--weights", str(WEIGHTS),
                     "--store", str(store))
    sentence = assert_clean_error(result, "Could not download the cifar10 dataset",
                                  "python cli.py extract DIR", "--weights PATH")
    assert "Temporary failure in name resolution" in sentence
    assert snapshot(store) == before


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
def test_imagenet_weights_failing_offline(store: Path, offline: None) -> None:
    before = snapshot(store)
    result = run_cli("extract", str(MINI), *MOBILENET, "--weights", "imagenet", "--quiet",
                     "--store", str(store))
    assert_clean_error(result, "Could not download the ImageNet weights for mobilenet",
                       "--weights PATH")
    assert snapshot(store) == before
    assert Store(store).unfinished() == []


@pytest.mark.parametrize("command", [["fit", "--head", "mlp"], ["evaluate"]])
def test_fit_or_evaluate_before_any_extract(tmp_path: Path, command: list[str]) -> None:
    result = run_cli(*command, "--store", str(tmp_path / "empty"))
    assert_clean_error(result, "No finished cache", "python cli.py extract DATASET")
    assert not (tmp_path / "empty").exists()


def test_a_store_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert_clean_error(run_cli("list", "--store", str(tmp_path / "file")), "is a file")


def test_a_second_writer_is_turned_away(tmp_path: Path) -> None:
    """While one process holds a cache's write lock, another stops with a sentence."""
    import fcntl

    from tests.helpers import make_plan
    from extract.pipeline import extract_features
    from store.errors import HeadstartError

    root = make_folder(tmp_path / "d", {"cat": 6, "dog": 6})
    plan = make_plan(root)
    the_store = Store(tmp_path / "store")
    the_store.caches_dir.mkdir(parents=True)
    with open(the_store.caches_dir / f"{plan.fingerprint}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        with pytest.raises(HeadstartError, match="Another headstart process is writing"):
            extract_features(plan, the_store, progress=False)


def test_fixed_choices_are_the_librarys() -> None:
    """The CLI's enums (what --help lists and typer checks) are the library's own tuples."""
    import cli
    from classifiers.combine import METHODS
    from endtoend.export import FORMATS, QUANTIZATIONS
    from extract.backbones import POOLINGS
    from extract.compute import PRECISIONS
    from extract.plan import TTA_MODES
    from extract.run import ENGINES
    from store.layout import FEATURE_DTYPES

    for enum, values in ((cli.Pooling, POOLINGS), (cli.Dtype, FEATURE_DTYPES),
                         (cli.Precision, PRECISIONS), (cli.Engine, ENGINES),
                         (cli.Method, METHODS), (cli.ExportFormat, FORMATS),
                         (cli.Quantization, QUANTIZATIONS), (cli.Tta, TTA_MODES)):
        assert tuple(e.value for e in enum) == tuple(values), enum


#: Fixed choices are enums: typer refuses a typo (exit 2) naming the value and the choices.
CHOICE_ERRORS = {
    "unknown pooling": (["extract", str(MINI), *MOBILENET, "--pooling", "median"], "median"),
    "unknown dtype": (["extract", str(MINI), *MOBILENET, "--dtype", "int8"], "int8"),
    "unknown engine": (["extract", str(MINI), "--engine", "spark"], "spark"),
    "unknown method": (["ensemble", "--method", "bagging"], "bagging"),
    "unknown format": (["predict", str(MINI), "--format", "xml"], "xml"),
    "unknown export format": (["export", "--format", "onnx2"], "onnx2"),
}


@pytest.mark.parametrize("case", CHOICE_ERRORS)
def test_a_mistyped_choice_is_refused_before_any_work(store: Path, case: str) -> None:
    args, bad = CHOICE_ERRORS[case]
    before = snapshot(store)
    result = run_cli(*args, "--store", str(store))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and repr(bad) in result.output
    assert "is not one of" in result.output
    assert snapshot(store) == before


def test_use_pins_the_default_cache_and_every_command_says_why(tmp_path: Path) -> None:
    """A newer cache does not move a pinned default; commands name the cache and the reason."""
    store = tmp_path / "store"
    base = ["extract", str(MINI), *MINI_ARGS[:-3], "--quiet", "--store", str(store)]
    assert run_cli(*base, "--image-size", "32").exit_code == 0
    first = Store(store).find_cache(None)
    assert run_cli("fit", "--head", "logreg", "--store", str(store)).exit_code == 0
    pinned = run_cli("use", first.short_id, "--store", str(store))
    assert pinned.exit_code == 0 and first.name in pinned.output
    assert run_cli(*base, "--image-size", "40").exit_code == 0  # a newer cache
    evaluated = run_cli("evaluate", "--store", str(store))
    assert evaluated.exit_code == 0, evaluated.output
    assert f"Cache {first.name} ({first.short_id}): pinned with 'use'." in evaluated.output
    listing = run_cli("list", "--store", str(store)).output
    assert f"{first.name} * (pinned)" in listing
    unpinned = run_cli("use", "--newest", "--store", str(store))
    assert unpinned.exit_code == 0 and "the newest" in unpinned.output
    newest = run_cli("evaluate", "--store", str(store))  # the new cache has no head yet
    assert_clean_error(newest, "No heads are fitted on cache")
    assert "the newest; pin another with 'use'" in newest.output
    assert_clean_error(run_cli("use", "--store", str(store)), "Name the cache to pin")


def test_an_unexpected_exception_is_one_sentence(tmp_path: Path, monkeypatch) -> None:
    import store.inventory

    def broken(_store):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(store.inventory, "inventory", broken)
    result = run_cli("list", "--store", str(tmp_path))
    assert_clean_error(result, "unexpected ZeroDivisionError: division by zero", "HEADSTART_DEBUG")
    monkeypatch.setenv("HEADSTART_DEBUG", "1")
    assert isinstance(run_cli("list", "--store", str(tmp_path)).exception, ZeroDivisionError)


def test_backbones_version_and_store(tmp_path: Path) -> None:
    listed = run_cli("backbones", "--store", str(tmp_path))
    assert listed.exit_code == 0 and "256 (a=0.25)" in listed.output
    assert "1024 (a=1.0)" in listed.output
    version = run_cli("--version")
    assert version.exit_code == 0 and version.output.startswith("headstart ")


def _serve(store: Path, *options: str):
    return run_cli("serve", "--head", "logreg", "--store", str(store), *options)


def test_serve_refuses_unsafe_or_impossible_start_ups(fitted_store, monkeypatch) -> None:
    """Each is refused in one sentence before the model loads or anything listens."""
    store, _ = fitted_store
    monkeypatch.delenv("HEADSTART_TOKEN", raising=False)
    assert_clean_error(_serve(store, "--token", ""), "token is empty")
    monkeypatch.setenv("HEADSTART_TOKEN", "  ")
    assert_clean_error(_serve(store), "token is empty")
    monkeypatch.delenv("HEADSTART_TOKEN")
    assert_clean_error(_serve(store, "--host", "0.0.0.0"), "--token", "--insecure")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _serve(store, "--port", str(port))
    assert_clean_error(result, f"Port {port} on 127.0.0.1 is already in use")
    assert "Serving" not in result.output


def test_a_single_class_dataset_is_refused_at_extract(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "one", {"cat": 6})
    store = tmp_path / "store"
    result = run_cli("extract", str(root), *MINI_ARGS[:-3], "--store", str(store))
    assert_clean_error(result, "holds one class folder (cat)", "at least two classes")
    assert not (store / "caches").exists() or not any((store / "caches").iterdir())


def test_messages_name_the_path_as_typed_not_its_symlink_target(tmp_path: Path) -> None:
    real = tmp_path / "real-folder"
    (real / "nothing-here").mkdir(parents=True)
    (real / "nothing-here" / "notes.txt").write_text("x")
    link = tmp_path / "my-link"
    link.symlink_to(real)
    (real / "nothing-here").rename(real / "empty")
    result = run_cli("extract", str(tmp_path / "my-link" / "empty"), "--store", str(tmp_path / "s"))
    sentence = assert_clean_error(result, str(link / "empty"))
    assert "real-folder" not in sentence


def test_caches_take_readable_names(tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = ["extract", str(MINI), *MINI_ARGS[:-3], "--quiet", "--store", str(store)]
    made = run_cli(*base, "--image-size", "32", "--name", "mini32")
    assert made.exit_code == 0, made.output
    listing = json.loads(run_cli("list", "--json", "--store", str(store)).output)
    assert [c["name"] for c in listing["caches"]] == ["mini32"]
    assert run_cli("fit", "--head", "logreg", "--cache", "mini32", "--store", str(store)).exit_code == 0
    verified = run_cli("verify", "mini32", "--store", str(store))
    assert verified.exit_code == 0 and "Checked 1 caches" in verified.output
    before = snapshot(store)
    assert_clean_error(run_cli(*base, "--image-size", "40", "--name", "mini32"),
                       "The name 'mini32' is taken by cache")
    assert snapshot(store) == before  # refused before the backbone pass
    assert_clean_error(run_cli(*base, "--image-size", "32", "--name", "beef01"),
                       "not only hex digits")
    renamed = run_cli(*base, "--image-size", "32", "--name", "mini-small")  # reused, renamed
    assert renamed.exit_code == 0 and "Reused cache mini-small" in renamed.output
    assert run_cli("evaluate", "--cache", "mini-small", "--store", str(store)).exit_code == 0


def test_predict_counts_each_file_once_clamps_top_and_fails_on_unread_files(
        fitted_store, tmp_path: Path) -> None:
    store, _ = fitted_store
    folder = tmp_path / "photos"
    folder.mkdir()
    image = next((MINI / "test" / "cat").glob("*.jpg"))
    (folder / "cat.jpg").write_bytes(image.read_bytes())
    once = run_cli("predict", str(folder / "cat.jpg"), str(folder), str(folder / "*.jpg"),
                   "--head", "logreg", "--top", "50", "--format", "json", "--store", str(store))
    assert once.exit_code == 0, once.output
    assert "Classifying 1 file with" in once.output
    answers = json.loads(once.output[once.output.index("["):once.output.rindex("]") + 1])
    assert len(answers) == 1 and len(answers[0]["predictions"]) == 10  # 10 classes, not 50
    (folder / "broken.jpg").write_bytes(b"not an image")
    mixed = run_cli("predict", str(folder), "--head", "logreg", "--store", str(store))
    assert mixed.exit_code == 1 and "Traceback" not in mixed.output
    assert "1 classified, 1 could not be read" in mixed.output


def test_show_augment_prints_no_library_lines(tmp_path: Path) -> None:
    """A fresh process: TensorFlow's C++ start-up lines (absl, oneDNN, cuInit) never reach the
    user; stdout has the one result line, stderr nothing."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "show-augment", str(MINI),
                           "--image-size", "32", "--count", "2", "--views", "1",
                           "--out", str(tmp_path / "grid.png")],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
    assert done.stdout.startswith("Augmentation grid (2 images x 1 views) written to")
