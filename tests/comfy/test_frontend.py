"""Every UI workflow loads in the real ComfyUI front end (comfyui-frontend-package) in headless Chromium.

The session server serves the front end; Playwright drives Debian's ``chromium`` (``CHROMIUM`` or
/usr/bin/chromium; never a downloaded browser). For each workflow, asked of the app's own state
(``window.app.graph``): as many nodes as the file, each with its id, type and title, no error flag,
the saved widget values, all links; and no "missing nodes" dialog (a test shows that this check does
fire for an unknown node).  A screenshot for people goes to ``HYPERLORA_SCREENSHOT_DIR`` (default: the
pytest temp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "example_workflows"
UI_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1700, "height": 1050}


def _chromium() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file():
            return cand
    return None


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory):
    try:
        from playwright import sync_api
    except ImportError:
        skip_or_fail("pip install playwright (the browser is Debian's chromium)")
    exe = _chromium()
    if exe is None:
        skip_or_fail("no Chromium: apt-get install -y chromium (or set CHROMIUM)")
    # first start of the front end opens the template browser; a user who finished it never sees it again
    req = urllib.request.Request(comfy_server.url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(req, timeout=30).close()
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        # Playwright passes --user-data-dir itself for a persistent context
        browser = p.chromium.launch_persistent_context(str(profile), executable_path=exe, headless=True,
                                                       args=CHROMIUM_FLAGS, viewport=VIEWPORT)
        pg = browser.new_page()
        pg.page_errors = []
        pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
        pg.goto(comfy_server.url, wait_until="networkidle", timeout=180_000)
        pg.wait_for_function("window.app && window.app.graph && window.app.canvas", timeout=180_000)
        pg.evaluate("() => { window.app.canvas.min_font_size_for_lod = 0 }")   # draw text at any zoom (screenshots)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shot_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("HYPERLORA_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _dialog_texts(page) -> list[str]:
    return page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")


def test_missing_nodes_are_detected(page):
    """The check below can fail: a workflow with an unknown node type does raise the dialog."""
    wf = json.loads((WORKFLOWS / "t2i_one_photo.json").read_text())
    wf["nodes"][1]["type"] = "NoSuchNodeHyperLoRATest"
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.wait_for_timeout(800)
    texts = _dialog_texts(page)
    assert any("Missing" in t and "NoSuchNodeHyperLoRATest" in t for t in texts), texts
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    assert not any("Missing" in t for t in _dialog_texts(page))


@pytest.mark.parametrize("name", UI_NAMES)
def test_ui_workflow_loads_without_missing_nodes(name, page, shot_dir):
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    page.page_errors.clear()
    page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }", [wf, name])
    page.wait_for_timeout(1200)
    texts = _dialog_texts(page)
    assert not any("Missing" in t for t in texts), texts
    assert page.evaluate("() => window.app.graph._nodes.length") == len(wf["nodes"])
    # widgets the front end does not save (Preview Any's 'preview' text) are not in widgets_values
    loaded = page.evaluate("""() => window.app.graph._nodes.map(n => ({
        id: n.id, type: n.type, title: n.title, errors: !!n.has_errors,
        widgets: (n.widgets || []).filter(w => w.serialize !== false).length,
        values: (n.widgets || []).filter(w => w.serialize !== false).map(w => w.value)}))""")
    assert page.evaluate("() => window.app.graph.links instanceof Map ? window.app.graph.links.size "
                         ": Object.keys(window.app.graph.links).length") == len(wf["links"])
    by_id = {n["id"]: n for n in loaded}
    assert sorted(by_id) == sorted(n["id"] for n in wf["nodes"])
    for node in wf["nodes"]:
        got = by_id[node["id"]]
        assert got["type"] == node["type"] and got["title"] == node["title"]
        assert not got["errors"], (name, node["type"])
        assert got["widgets"] == len(node["widgets_values"]), (name, node["type"], got["values"])
        assert got["values"] == node["widgets_values"], (name, node["type"])
    assert page.page_errors == []
    page.screenshot(path=str(shot_dir / f"{name}.png"))   # for people (README); the asserts above are the test
