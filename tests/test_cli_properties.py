"""Property tests of the command line: any bad option value or path gets one clear sentence and a
non-zero exit, never a traceback, and never changes the caches or heads already in the store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from tests.conftest import MINI, WEIGHTS
from store.store import Store
from tests.reliability_support import tree_digest

runner = CliRunner()
TRIED: dict = {"commands": 0, "refused": 0, "file names": set()}
#: Examples per property; HEADSTART_CLI_EXAMPLES=500 for a long run outside the suite.
SETTINGS = settings(max_examples=int(os.environ.get("HEADSTART_CLI_EXAMPLES", "40")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

# Any text, including control characters, NUL, lone surrogates are left out (argv cannot hold them)
texts = st.text(st.characters(exclude_categories=("Cs",)), min_size=0, max_size=40)
odd_paths = st.one_of(
    texts,
    texts.map(lambda t: "/nonexistent/" + t),
    st.sampled_from(["", ".", "..", "/", "/dev/null", "/etc/passwd", "-", "--", "~", "\x00",
                     "a\x00b", "../" * 20, "x" * 5000, "/proc/self/mem", "*", "[", "?"]),
)


@pytest.fixture(scope="module")
def store(fitted_store: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("cli-properties") / "store"
    shutil.copytree(fitted_store[0], copy)
    return copy


@pytest.fixture(scope="module")
def fingerprint(store: Path) -> str:
    return next((store / "caches").glob("*.h5")).stem


def refused(store: Path, args: list[str]) -> None:
    """Run args against the store: it must fail with one sentence and change nothing."""
    before = tree_digest(store)
    result = runner.invoke(app, [*args, "--store", str(store)])
    TRIED["commands"] += 1
    output = result.output
    assert result.exit_code not in (0, None), (args[-6:], output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args, repr(result.exception))
    assert "Traceback" not in output, (args, output)
    ours = [line for line in output.splitlines() if line.startswith("Error: ")]
    usage = [line for line in output.splitlines() if line.startswith("│ ") or "Error" in line]
    if result.exit_code == 1:  # headstart's own: exactly one "Error: ..." sentence
        assert len(ours) == 1 and ours[0].rstrip().endswith((".", ")")), (args, output)
    else:  # click's usage error (exit 2): one message in its box
        assert result.exit_code == 2 and usage, (args, output)
    assert tree_digest(store) == before, args
    TRIED["refused"] += 1


EXTRACT_BASE = [str(MINI), "--backbone", "mobilenet", "--alpha", "0.25", "--weights",
                str(WEIGHTS), "--image-size", "32", "--quiet"]


def replaced(base: list[str], option: str, value: str) -> list[str]:
    args = list(base)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    return args


bad_extract_option = st.one_of(
    st.tuples(st.just("--image-size"), st.one_of(st.integers(max_value=31),
                                                  st.integers(min_value=1025)).map(str)),
    st.tuples(st.just("--image-size"), texts.filter(lambda t: not t.strip().lstrip("+-").isdigit())),
    st.tuples(st.just("--pooling"), texts.filter(lambda t: t not in ("avg", "max", "flatten"))),
    st.tuples(st.just("--dtype"), texts.filter(lambda t: t not in ("float16", "float32"))),
    st.tuples(st.just("--batch-size"), st.one_of(st.integers(max_value=0),
                                                  st.integers(min_value=4097)).map(str)),
    st.tuples(st.just("--test-fraction"), st.one_of(
        st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan"))).map(str)),
    st.tuples(st.just("--workers"), st.one_of(st.integers(max_value=0),
                                               st.integers(min_value=65)).map(str)),
    st.tuples(st.just("--augment"), st.one_of(st.integers(max_value=-1),
                                               st.integers(min_value=65)).map(str)),
    st.tuples(st.just("--alpha"), st.floats(allow_nan=True).filter(
        lambda a: a not in (0.25, 0.5, 0.75, 1.0)).map(str)),
    st.tuples(st.just("--backbone"), texts.filter(lambda t: t.strip() not in (
        "vgg16", "vgg19", "resnet50", "inception_v3", "mobilenet", "mobilenet_v2",
        "efficientnet_b0"))),
    st.tuples(st.just("--weights"), odd_paths.filter(lambda t: t not in ("imagenet", "none"))),
)


@SETTINGS
@given(bad=bad_extract_option)
def test_extract_bad_option_values(store: Path, bad: tuple[str, str]) -> None:
    refused(store, ["extract", *replaced(EXTRACT_BASE, *bad)])


@SETTINGS
@given(path=odd_paths.filter(lambda p: p.strip() not in ("cifar10", "cifar100", "mnist",
                                                         "fashion_mnist")))
def test_extract_bad_dataset_paths(store: Path, path: str) -> None:
    refused(store, ["extract", path, *EXTRACT_BASE[1:]])


head_names = texts.filter(lambda t: t not in ("mlp", "logreg"))
param_pairs = st.one_of(
    texts.filter(lambda t: "=" not in t),  # no KEY=VALUE
    st.tuples(texts.filter(lambda t: t.strip() not in ("C", "max_iter", "tol") and "=" not in t),
              texts).map("=".join),  # unknown key
    st.tuples(st.sampled_from(["C", "max_iter", "tol"]),
              texts.filter(lambda t: not _number(t))).map("=".join),  # bad value
)


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


@SETTINGS
@given(data=st.data())
def test_fit_evaluate_bad_values(store: Path, fingerprint: str, data: st.DataObject) -> None:
    choice = data.draw(st.sampled_from(["head", "param", "name", "cache", "evaluate"]))
    if choice == "head":
        args = ["fit", "--head", data.draw(head_names)]
    elif choice == "param":
        args = ["fit", "--head", "logreg", "-p", data.draw(param_pairs)]
    elif choice == "name":
        name = data.draw(st.one_of(texts, st.sampled_from(["../x", "a/b", ".hidden", "", "x" * 65,
                                                           "..", "-", "a b"])))
        if name and name[0].isalnum() and all(c.isascii() and (c.isalnum() or c in "_.-")
                                              for c in name) and len(name) <= 64:
            name = "../" + name  # a valid name would fit a head: make it invalid
        args = ["fit", "--head", "logreg", "--name", name]
    elif choice == "cache":
        selector = data.draw(texts.filter(lambda t: not fingerprint.startswith(t.lower())
                                          and not t.startswith("cifar10-mini")))
        args = ["fit", "--head", "logreg", "--cache", selector]
    else:
        args = ["evaluate", "--head", data.draw(head_names.filter(lambda t: t != ""))]
    refused(store, args)


@SETTINGS
@given(data=st.data())
def test_predict_verify_list_bad_values(store: Path, fingerprint: str, data: st.DataObject) -> None:
    choice = data.draw(st.sampled_from(["format", "top", "inputs", "verify", "head"]))
    if choice == "format":
        args = ["predict", str(MINI / "test"), "--head", "logreg", "--format",
                data.draw(texts.filter(lambda t: t not in ("table", "csv", "json")))]
    elif choice == "top":
        args = ["predict", str(MINI / "test"), "--head", "logreg", "--top",
                str(data.draw(st.integers(max_value=0)))]
    elif choice == "inputs":
        args = ["predict", data.draw(odd_paths.map(lambda p: "/nonexistent/" + p)),
                "--head", "logreg"]
    elif choice == "head":
        args = ["predict", str(MINI / "test"), "--head", data.draw(head_names)]
    else:
        args = ["verify", data.draw(texts.filter(lambda t: t and not fingerprint.startswith(
            t.lower()) and not t.startswith("cifar10-mini")))]
    refused(store, args)


def file_name(text: str) -> str:
    """A drawn text as a file name the file system takes (no '/', no NUL, at most 200 bytes)."""
    name = text.replace("/", "_").replace("\x00", "_")
    while len(os.fsencode(name)) > 200:
        name = name[:-1]
    return name if name not in ("", ".", "..") else f"a-file{name}"


@SETTINGS
@given(path=odd_paths)
def test_store_that_is_not_a_folder(path: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """--store naming a file (its name drawn), or a path below that file: one sentence each."""
    folder = tmp_path_factory.mktemp("not-a-folder", numbered=True)
    afile = folder / file_name(path)
    afile.write_text("not a store")
    for store in (afile, afile / "below"):
        result = runner.invoke(app, ["list", "--store", str(store)])
        TRIED["commands"] += 1
        assert result.exit_code == 1, (store, result.output)
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert len(errors) == 1, (store, result.output)
        TRIED["refused"] += 1
    assert afile.read_text() == "not a store"  # never written to
    TRIED["file names"].add(afile.name)


def test_tried_figure() -> None:
    """Not a check: prints what the property tests ran, from their counters."""
    print(f"\nCLI properties: {TRIED['commands']} bad command lines run, {TRIED['refused']} "
          f"refused with one sentence and the store unchanged; {len(TRIED['file names'])} "
          "distinct file names tried as --store")


@pytest.fixture(scope="module")
def ensemble_store(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the module's store with a greedy ensemble of its logreg and mlp, made by the
    ensemble command."""
    copy = tmp_path_factory.mktemp("ensemble-props") / "store"
    shutil.copytree(store, copy)
    made = runner.invoke(app, ["ensemble", "--store", str(copy)])
    assert made.exit_code == 0, made.output
    return copy


known_heads = ("mlp", "logreg", "ensemble")
blank = st.text(st.sampled_from(" \t"), min_size=0, max_size=4)


@SETTINGS
@given(data=st.data())
def test_report_ensemble_tune_serve_use_bad_values(ensemble_store: Path, data: st.DataObject
                                                   ) -> None:
    """Over a store that holds an ensemble: every drawn bad value of report, ensemble, tune,
    serve's start-up options and use is one sentence (or a usage error), nothing changed, and
    no server ever starts."""
    fingerprint = Store(ensemble_store).find_cache().fingerprint
    bad_head = texts.filter(lambda t: t not in known_heads)
    choice = data.draw(st.sampled_from(["report", "ensemble-heads", "ensemble-rounds", "tune",
                                        "serve-port", "serve-token", "serve-host", "use"]))
    if choice == "report":
        args = ["report", "--head", data.draw(bad_head)]
    elif choice == "ensemble-heads":
        names = data.draw(st.lists(bad_head.filter(lambda t: "," not in t and t.strip()),
                                   min_size=1, max_size=3))
        args = ["ensemble", "--heads", ",".join(["logreg", *names])]
    elif choice == "ensemble-rounds":
        args = ["ensemble", "--rounds", str(data.draw(st.integers(max_value=0))), "--replace"]
    elif choice == "tune":
        args = ["tune", "--head", "logreg", "--trials", str(data.draw(st.integers(max_value=0)))]
    elif choice == "serve-port":
        port = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=65536)))
        args = ["serve", "--head", "logreg", "--port", str(port)]
    elif choice == "serve-token":
        args = ["serve", "--head", "logreg", "--token", data.draw(blank), "--port", "1"]
    elif choice == "serve-host":
        host = data.draw(st.sampled_from(["0.0.0.0", "10.1.2.3", "192.168.0.9", "::"]))
        args = ["serve", "--head", "logreg", "--host", host, "--port", "1"]
    else:
        args = ["use", data.draw(texts.filter(
            lambda t: t.strip() and not fingerprint.startswith(t.lower())
            and not t.startswith("cifar10-mini")))]
    refused(ensemble_store, args)
