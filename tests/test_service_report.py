"""report: the figures exist, are valid PNGs, and the page shows them."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from tests.service_support import ENSEMBLES, ensemble_store, service_store


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


@pytest.mark.parametrize("head", ENSEMBLES)
def test_report_of_an_ensemble_compares_members(tmp_path, head: str) -> None:
    """A real ensemble (made by `ensemble`, every method, and one across two caches) gets a
    members-vs-ensemble figure."""
    store, first = ensemble_store()
    result = CliRunner().invoke(app, ["report", "--head", head, "--cache", first, "--out",
                                      str(tmp_path), "--store", str(store)])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "members.png") as image:
        image.verify()
    assert "members.png" in (tmp_path / "index.html").read_text()
