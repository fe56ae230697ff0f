"""The report in a real browser: headless Chromium paints it, its DOM holds the key figures, and the
page asks the network for nothing.

How "no request leaves the file" is proven: Chromium writes a net log (``--log-net-log``) of every
URL request it starts. Requests made on behalf of the page carry the page's network isolation key
(``file://…``); Chromium's own background traffic (component updater, network time, account
lookups, which headless Chromium still starts despite ``--disable-background-networking``) carries
another one and is not the page's doing. The test asserts that no request has the page's key, and
a control page with an ``<img>`` and a CSS ``url()`` pointing at the network proves that the same
detector sees such requests. Everything goes to a dead proxy (``127.0.0.1:9``), so even the
browser's own traffic never leaves the machine. The DOM is also checked for network URLs.

Without Chromium the test is skipped, except under CI (``CI=true``), where it fails.

The screenshot this test checks is the one docs/report.md shows: ``make screenshots`` runs the test with
``SURGERY_DOCS_SCREENSHOTS=1``, which writes its top part to ``docs/img/report.png`` (and the Chromium
version beside it); otherwise the test checks that the committed picture still is this page, painted by the
same Chromium version, so a change to the report that is not re-photographed fails here.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from surgery.files import write_atomic
from surgery.report.render import write_case_report

try:  # tests/ is on sys.path (rootdir-relative, no __init__.py) ...
    from test_report import NETWORK_URL, synthetic_result
except ImportError:  # ... or a package
    from tests.test_report import NETWORK_URL, synthetic_result

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--proxy-server=127.0.0.1:9",
    "--hide-scrollbars",
]
WINDOW = (1280, 2400)
DOCS_SHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "report.png"
DOCS_SHOT_HEIGHT = 1500  # the banner, the expectations, the coverage map and the first drift plots


def find_chromium() -> str:
    found = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.access(p, os.X_OK)), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed, and CI=true requires the browser test (.ci/run installs it)")
        pytest.skip("chromium not installed")
    return found


def open_page(chromium: str, page: Path, work: Path, name: str) -> tuple[str, Path, list[dict]]:
    """Load ``page`` headless: return the dumped DOM, the screenshot path and the page's own requests."""
    shot, netlog = work / f"{name}.png", work / f"{name}-net.json"
    cmd = [
        chromium,
        *FLAGS,
        f"--user-data-dir={work / (name + '-profile')}",
        f"--log-net-log={netlog}",
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    if not shot.is_file():  # older headless modes take one action per run
        cmd = [c for c in cmd if c != "--dump-dom" and not c.startswith("--log-net-log")]
        subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return run.stdout, shot, _page_requests(netlog)


def _page_requests(netlog: Path) -> list[dict]:
    """URL requests started on behalf of a ``file://`` page, from a Chromium net log."""
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    out = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event.get("type") == start_job and str(params.get("network_isolation_key", "")).startswith("file://"):
            out.append({"url": params.get("url"), "initiator": params.get("initiator")})
    return out


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


@pytest.fixture(scope="module")
def painted_report(chromium, tmp_path_factory):
    """The synthetic result's report, painted once: the result, its DOM, screenshot and requests."""
    work = tmp_path_factory.mktemp("browser")
    result = synthetic_result()
    page = write_case_report(result, work / "reports")
    return (result, *open_page(chromium, page, work, "report"))


def test_report_in_headless_chromium(painted_report):
    result, dom, shot, requests = painted_report

    # the page asked for nothing (its own file is loaded without a network request)
    assert requests == [], requests
    assert not NETWORK_URL.search(dom)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", dom, re.I)

    # the key figures are in the rendered DOM's text
    body = re.sub(r"<(style|svg)\b.*?</\1>", " ", dom, flags=re.S)
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())
    for needle in (
        result.case,
        "FAIL — 4/5 expectations held",
        "activations.drift_max",
        "98.77%",
        "97.12%",
        "41.23%",
        "93.45%",
        "81.23%",
        "0.962",
        "fc.weight",
        "Layer map: which source block each patient block resembles",
        "layer4.1 ← layer4.2 1",
        "layer2.0 ← layer2.1 0.9266",
    ):
        assert needle in text, needle
    assert '<th class="num">CKA</th>' in dom and ">0.975<" in dom  # the CKA column of the layer table
    assert dom.count("<svg") == 22  # 20 before the layer maps: one heatmap per stage

    # the screenshot is not blank: varied pixels, the verdict banner's red and the plots' colours painted
    image = rgb(shot)
    assert image.shape[:2] == (WINDOW[1], WINDOW[0])
    assert image.std() > 0.1
    assert (image.mean(axis=2) < 0.9).mean() > 0.03  # a real share of the page is ink, not background
    for colour in ("#cf222e", "#e66100", "#5d3a9b"):  # banner (fail), after surgery, after fine-tune
        assert pixels_near(image, colour) > 200, colour


def test_the_docs_screenshot_is_this_page(chromium, painted_report):
    """docs/img/report.png is the top of the page the test above checks (``make screenshots`` renews it)."""
    top = rgb(painted_report[2])[:DOCS_SHOT_HEIGHT]
    version = chromium_version(chromium)
    stamp = DOCS_SHOT.with_suffix(".chromium")
    if os.environ.get("SURGERY_DOCS_SCREENSHOTS") == "1":
        write_png(DOCS_SHOT, top)
        write_atomic(stamp, lambda partial: partial.write_text(version + "\n", encoding="utf-8"))
    if not stamp.is_file() or stamp.read_text(encoding="utf-8").strip() != version:
        pytest.skip(f"docs/img/report.png was painted by another Chromium than {version}")
    docs = rgb(DOCS_SHOT)
    assert docs.shape == top.shape, "docs/img/report.png is stale: run `make screenshots`"
    differing = (np.abs(docs - top).max(axis=2) > 0.1).mean()
    assert differing < 0.005, f"docs/img/report.png is stale ({differing:.1%} of pixels differ): run `make screenshots`"


def chromium_version(chromium: str) -> str:
    out = subprocess.run([chromium, "--version"], capture_output=True, text=True, timeout=60).stdout
    return " ".join(out.split()[:2])


def write_png(path: Path, image: np.ndarray) -> None:
    """Write ``image`` (floats in [0, 1]) as a PNG, atomically."""
    import matplotlib.image

    write_atomic(path, lambda partial: matplotlib.image.imsave(partial, np.clip(image, 0, 1), format="png"))


def rgb(path: Path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(path)  # PNG: floats in [0, 1]
    return np.asarray(image[..., :3], dtype=float)


def pixels_near(image: np.ndarray, colour: str, tol: float = 0.04) -> int:
    target = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(image - target).max(axis=2) < tol).sum())
