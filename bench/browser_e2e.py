"""End-to-end check of the web page in headless Chromium (Debian's /usr/bin/chromium).

    python bench/browser_e2e.py --store /tmp/svc-load --head mlp --screenshot /tmp/e2e.png

Starts `serve` on 127.0.0.1, opens the page, uploads a shared CIFAR test image through the file
input, waits for the bars, checks the top class shown equals the API's answer for the same
bytes, saves a screenshot, and stops the server. Exit code 0 when every check passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import SHARED, running_server  # noqa: E402

IMAGE = SHARED / "data" / "cifar10-mini" / "test" / "ship" / "4900.jpg"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def api_answer(url: str, image: Path) -> dict:
    request = urllib.request.Request(f"{url}/predict?top=5", data=image.read_bytes(),
                                     headers={"content-type": "image/jpeg"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/tmp/svc-load")
    parser.add_argument("--head", default="mlp")
    parser.add_argument("--image", type=Path, default=IMAGE)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshot", type=Path, default=Path("/tmp/headstart-e2e.png"))
    args = parser.parse_args()
    with running_server(args.store, args.head) as url:
        expected = api_answer(url, args.image)["predictions"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 800, "height": 640})
            page.goto(f"{url}/", wait_until="networkidle")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('head')")
            page.set_input_files("#file", str(args.image))
            page.wait_for_selector("#results .row", timeout=30_000)
            rows = page.eval_on_selector_all(
                "#results .row", "rows => rows.map(r => [r.querySelector('.label').textContent,"
                " r.querySelector('.pct').textContent, r.querySelector('.fill').style.width])")
            status = page.text_content("#status")
            error = page.text_content("#error")
            page.screenshot(path=str(args.screenshot), full_page=True)
            browser.close()
    print(f"image: {args.image} (true class {args.image.parent.name})")
    print(f"page status: {status!r}; error: {error!r}")
    for label, pct, width in rows:
        print(f"  {label:<12} {pct:>7}  bar width {width}")
    api_top = [p["label"] for p in expected]
    print(f"API top-5 for the same bytes: {api_top}")
    checks = {
        "five bars shown": len(rows) == 5,
        "same classes, same order as the API": [r[0] for r in rows] == api_top,
        "top probability shown matches the API": rows and
        rows[0][1] == f"{100 * expected[0]['probability']:.1f}%",
        "no error shown": not error,
    }
    for name, ok in checks.items():
        print(f"[{'PASS' if ok else 'FAIL'}] {name}")
    print(f"screenshot saved to {args.screenshot}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
