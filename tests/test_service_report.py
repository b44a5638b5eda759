"""report: the figures exist, are valid PNGs, and the page shows them."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from cli import app
from tests.service_support import service_store
from store.store import Store


def test_report_writes_valid_pngs_and_a_page(tmp_path) -> None:
    result = CliRunner().invoke(app, ["report", "--head", "mlp", "--out", str(tmp_path),
                                      "--store", str(service_store())])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "index.html") in result.output.replace("\n", "")
    page = (tmp_path / "index.html").read_text()
    for name in ("samples.png", "curves.png", "confusion.png", "per_class.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
            assert min(image.size) > 200
        assert name in page


def test_report_of_an_ensemble_compares_members(tmp_path) -> None:
    """A head whose sidecar lists members gets a members-vs-ensemble figure."""
    store = Store(service_store())
    cache = store.find_cache()
    sidecar = store.head_dir(cache) / "logreg.json"
    record = json.loads(sidecar.read_text())
    record["members"] = ["mlp", "logreg"]
    copy = store.head_dir(cache) / "members-demo.json"
    copy.write_text(json.dumps({**record, "name": "members-demo"}))
    try:
        result = CliRunner().invoke(app, ["report", "--head", "members-demo", "--out", str(tmp_path),
                                          "--store", str(service_store())])
    finally:
        copy.unlink()
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "members.png") as image:
        image.verify()
