"""The review desk in a real browser: headless Chromium from Debian's packages driven by Playwright for Python
(pointed at that executable; no browser download), against `wsi-il review` serving the bundled slide.

Without chromium these tests FAIL in CI (the environment variable CI is set; .ci/run installs chromium) and are
skipped only elsewhere, with the reason. One project and one server serve the whole module, in order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from test_cli_e2e import run
from test_desk_server import ledger, make_desk_project, start_server, truth_answers

from wsi_il.batch import read_batch
from wsi_il.labels import read_labels

CHROMIUM = shutil.which("chromium")


def _need(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(
            f"{what}: the browser tests need it in CI (.ci/run installs Debian's chromium; "
            "pip install -e '.[test]' installs playwright)",
            pytrace=False,
        )
    pytest.skip(f"{what} (these tests fail instead of skipping where CI is set)")


@pytest.fixture(scope="module")
def desk(tmp_path_factory):
    """(project, server URL, page) of a project with a session started, served by `wsi-il review`."""
    if CHROMIUM is None:
        _need("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("Playwright for Python is not installed (pip install playwright; no browser download needed)")
    project = make_desk_project(tmp_path_factory.mktemp("desk-browser") / "cmu")
    server, _, web = start_server(project)
    web.close()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield project, server, page, errors
            browser.close()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def _open(page, server) -> None:
    page.goto(server.url)  # the URL with the token, as printed
    page.wait_for_selector("body[data-ready=true]")


def _current(page) -> str:
    return page.get_attribute('#strip .patch[aria-current="true"]', "data-patch-id")


def test_a_whole_batch_by_keyboard_then_a_correction_on_the_slide_then_export(desk):
    project, server, page, errors = desk
    _open(page, server)
    truth = truth_answers(project, "s1-r1")
    items = page.locator("#strip .patch[data-patch-id]")
    assert items.count() == len(truth) == 6
    assert sorted(items.evaluate_all("els => els.map(e => e.dataset.patchId)")) == sorted(truth)
    assert page.locator('[aria-current="true"]').count() == 1
    assert page.inner_text("#progress").startswith("1 of 6 · 0 answered")

    first = _current(page)
    page.keyboard.press(truth[first])
    assert _current(page) != first  # moved on to the next unanswered patch
    page.keyboard.press("k")  # back to the first
    assert _current(page) == first
    page.keyboard.press("Backspace")
    page.wait_for_function("() => window.deskState.labels[window.deskState.order[0]] === undefined")
    page.keyboard.press("u")  # the answer is back
    page.wait_for_function("() => window.deskState.labels[window.deskState.order[0]] !== undefined")
    page.keyboard.press("j")
    answered = 1
    while answered < len(truth):
        patch = _current(page)
        page.keyboard.press(truth[patch])
        answered += 1
        assert f"{answered} answered" in page.inner_text("#progress")
    assert page.is_enabled("#submit")
    page.wait_for_function("() => window.deskState.pending === 0")  # each answer was sent as it was given:
    info, patches = read_batch(project / "batches" / "s1-r1")  # labels.csv is complete before Enter
    assert len(read_labels(project / "batches" / "s1-r1" / "labels.csv", info, patches)) == len(truth)
    page.wait_for_function(
        "() => document.getElementById('ahead').textContent === 'next round ready'", timeout=120_000
    )  # the round for these answers, prepared while the expert looks
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.getElementById('progress').textContent.includes('batch s1-r2')", timeout=120_000
    )
    assert page.inner_text("#progress").startswith("1 of 6 · 0 answered")
    assert page.evaluate("() => window.deskState.lastRound.preparedAhead") is True
    assert page.inner_text("#ahead") == ""
    recorded = {e["patch_id"]: e["label"] for e in ledger(project) if e["batch"] == "s1-r1"}
    assert recorded == {p: "Tumor" if a == "y" else "Normal" for p, a in truth.items()}

    # The slide view: click a patch labelled in the first batch and correct it with one key.
    page.keyboard.press("v")
    page.wait_for_function(
        "() => window.deskSlideView && window.deskSlideView.ready && window.deskSlideView.overlays.labelled"
    )
    target, box = None, None
    for patch in truth:
        x, y = (int(v) for v in patch.rsplit("_x", 1)[1].split("_y"))
        point = page.evaluate(
            """([x, y]) => {
            const v = window.deskSlideView.viewer;
            const p = v.viewport.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
            const r = document.getElementById('viewer').getBoundingClientRect();
            const nav = document.querySelector('.navigator').getBoundingClientRect();
            const at = [r.left + p.x, r.top + p.y];
            const underNav = at[0] >= nav.left && at[0] <= nav.right && at[1] >= nav.top && at[1] <= nav.bottom;
            return underNav ? null : at;
        }""",
            [x + 64, y + 64],
        )
        if point is not None:
            target, box = patch, point
            break
    assert target is not None
    page.mouse.click(*box)
    page.wait_for_selector(f'#picked[data-patch-id="{target}"]')
    new = "Normal" if recorded[target] == "Tumor" else "Tumor"
    page.keyboard.press("1" if new == "Tumor" else "2")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('corrected')")
    last = ledger(project)[-1]
    assert (last["patch_id"], last["label"], last["source"], last["via"]) == (target, new, "correction", "page")

    # Status and export from the page.
    page.keyboard.press("t")
    page.wait_for_selector("#status h2")
    page.keyboard.press("e")
    page.wait_for_selector("#exports a", timeout=120_000)
    names = page.locator("#exports a").evaluate_all("els => els.map(e => e.textContent)")
    assert names == ["mask.geojson", "mask.png"]
    assert json.loads((project / "exports" / "mask.geojson").read_text())["type"] == "FeatureCollection"
    assert page.request.get(page.url.rstrip("/") + "/api/exports/mask.png").status == 200

    entries = ledger(project)
    assert len(entries) == len(truth) + 1  # six answers and one correction, nothing rewritten
    status = json.loads(run("status", project, "--json"))
    assert status["n_labels"] == len(truth) and status["corrections"][-1]["label"] == new
    assert not errors


def test_confident_suggestions_accepted_with_one_key_and_more_like_this(desk):
    project, server, page, errors = desk
    _open(page, server)
    batch = page.evaluate("() => window.deskState.batch")
    assert batch["batch"] == "s1-r2"
    patches = batch["patches"]
    for patch in patches:  # an uncertain suggestion looks uncertain
        item = page.locator(f'#strip .patch[data-patch-id="{patch["patch_id"]}"]')
        assert ("confident" if patch["confident"] else "check") in item.get_attribute("class")
        assert patch["confident"] == (patch["probability"] >= 0.75)
    confidents = [p["patch_id"] for p in patches if p["confident"]]
    order = [p["patch_id"] for p in patches]
    assert order[: len(confidents)] == confidents  # shown grouped, first
    page.keyboard.press("a")
    if confidents:
        page.wait_for_function(f"() => Object.keys(window.deskState.labels).length === {len(confidents)}")
        page.keyboard.press("u")
    page.wait_for_function("() => Object.keys(window.deskState.labels).length === 0")
    suggestion_class = page.get_attribute("#suggestion", "class")
    assert suggestion_class == ("confident" if patches[0]["confident"] else "uncertain")

    page.keyboard.press("m")  # more like this: the nearest unlabelled patches, all selected
    page.wait_for_selector("#similar-grid .patch.selected")
    shown = page.locator("#similar-grid .patch.selected").evaluate_all("els => els.map(e => e.dataset.patchId)")
    assert len(shown) == 12 and not set(shown) & set(order)
    page.locator("#similar-grid .patch.selected").nth(0).click()  # leave one out
    before = len(ledger(project))
    page.keyboard.press("2")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('one action')")
    added = ledger(project)[before:]
    assert len(added) == 11 and {e["label"] for e in added} == {"Normal"}
    assert {e["patch_id"] for e in added} == set(shown[1:]) and all(e["via"] == "page" for e in added)
    assert not errors
