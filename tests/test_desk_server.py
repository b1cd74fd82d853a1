"""The review desk's server: token and cookie, Host check, CSRF header, no file paths from the client, labels
checked as ingest checks them, submit = ingest (same lock, idempotent, a kill mid-submit loses and doubles
nothing), two tabs lose no label, corrections, "more like this", export, Ctrl-C/SIGTERM."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient
from test_cli_e2e import run

from wsi_il.batch import read_batch
from wsi_il.desk.desk import Desk
from wsi_il.desk.server import LOOPBACK_NAMES, TOKEN_HEADER, cookie_name, create_app
from wsi_il.errors import LabelsError, ProjectStateError
from wsi_il.labels import read_labels
from wsi_il.measure.truth import truth_mask
from wsi_il.project import Project

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TOKEN = "test-token-0123456789"
PORT = 8765
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def base_project(tmp_path_factory):
    """The bundled slide with a session started (3 rounds of 6); copied by each test that changes it."""
    return make_desk_project(tmp_path_factory.mktemp("desk") / "cmu")


def make_desk_project(project: Path) -> Path:
    """A project of the bundled slide (random weights, 128 px tiles) with a session started: 3 rounds of 6."""
    run(
        "init",
        project,
        "--slide",
        EXAMPLES / "CMU-1-Small-Region.svs",
        "--tile-size",
        "128",
        "--weights",
        "random",
        "--epochs",
        "2",
        "--device",
        "cpu",
    )
    run("query", project, "--region", EXAMPLES / "query.geojson", "-k", "6", "--rounds", "3", "--device", "cpu")
    return project


@pytest.fixture()
def project(base_project, tmp_path):
    target = tmp_path / "cmu"
    shutil.copytree(base_project, target)
    return target


def client(project: Path, signed_in: bool = True) -> TestClient:
    app = create_app(Desk(project, "cpu"), TOKEN, set(LOOPBACK_NAMES), PORT)
    web = TestClient(app, base_url=BASE)
    if signed_in:
        web.cookies.set(cookie_name(PORT), TOKEN)
    return web


def truth_answers(project: Path, batch: str) -> dict[str, str]:
    _, patches = read_batch(project / "batches" / batch)
    boxes = [[p.x, p.y, p.width, p.height] for p in patches]
    inside = truth_mask(np.array(boxes), EXAMPLES / "truth.geojson")
    return {p.patch_id: "y" if hit else "n" for p, hit in zip(patches, inside, strict=True)}


def post(web: TestClient, path: str, data: dict | None = None, token: str | None = TOKEN) -> httpx.Response:
    headers = {TOKEN_HEADER: token} if token is not None else {}
    return web.post(path, json=data or {}, headers=headers)


def answer_all(web: TestClient, project: Path, batch: str) -> dict[str, str]:
    answers = truth_answers(project, batch)
    reply = post(
        web, f"/api/batches/{batch}/answers", {"answers": [{"patch_id": p, "label": a} for p, a in answers.items()]}
    )
    assert reply.status_code == 200, reply.text
    return answers


def ledger(project: Path) -> list[dict]:
    path = project / "labels.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- security ---------------------------------------------------------------------------------------------
def test_every_request_needs_the_token_then_the_cookie(base_project):
    web = client(base_project, signed_in=False)
    for path in (
        "/",
        "/api/project",
        "/api/batches/s1-r1",
        "/static/desk.js",
        "/api/status",
        "/api/slides/CMU-1-Small-Region/thumbnail.jpeg",
    ):
        assert web.get(path).status_code == 401, path
    assert web.get("/?token=wrong").status_code == 401
    assert post(web, "/api/export").status_code == 401
    first = web.get(f"/?token={TOKEN}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/"  # the token leaves the address bar
    cookie = first.headers["set-cookie"]
    assert f"{cookie_name(PORT)}={TOKEN}" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    page = web.get("/")  # the client kept the cookie
    assert page.status_code == 200 and TOKEN in page.text
    assert web.get("/api/project").json()["batch"] == "s1-r1"
    web.cookies.clear()  # the cookie the server set, then a wrong one in its place
    web.cookies.set(cookie_name(PORT), "not-the-token")
    assert web.get("/api/project").status_code == 401


def test_the_host_header_must_be_ours(base_project):
    web = client(base_project)
    for host in ("evil.example", f"evil.example:{PORT}", "127.0.0.1.evil.example", "192.168.1.5"):
        reply = web.get("/api/project", headers={"host": host})
        assert reply.status_code == 403, host
    for host in (f"localhost:{PORT}", f"127.0.0.1:{PORT}", f"[::1]:{PORT}"):
        assert web.get("/api/project", headers={"host": host}).status_code == 200, host


def test_changes_need_the_token_header(project):
    web = client(project)
    labels = project / "batches" / "s1-r1" / "labels.csv"
    before = labels.read_bytes()
    patch = next(iter(truth_answers(project, "s1-r1")))
    body = {"answers": [{"patch_id": patch, "label": "y"}]}
    assert post(web, "/api/batches/s1-r1/answers", body, token=None).status_code == 403
    assert post(web, "/api/batches/s1-r1/answers", body, token="wrong").status_code == 403
    assert post(web, "/api/batches/s1-r1/submit", token=None).status_code == 403
    assert post(web, "/api/labels", body, token=None).status_code == 403
    assert post(web, "/api/export", token=None).status_code == 403
    assert labels.read_bytes() == before and not (project / "exports").exists()
    assert post(web, "/api/batches/s1-r1/answers", body).status_code == 200
    assert labels.read_bytes() != before


def test_the_client_never_names_a_file(project):
    web = client(project)
    (project / "exports").mkdir()
    for path in (
        "/api/batches/..%2F..%2Fproject.json",
        "/api/batches/s1-r9",
        "/api/batches/..",
        "/api/patches/..%2Fproject.json/context.jpeg",
        "/api/patches/x/similar",
        "/api/slides/..%2F..%2Fetc/thumbnail.jpeg",
        "/api/slides/CMU-1-Small-Region/overlays/..%2Fx.png",
        "/api/slides/CMU-1-Small-Region/tiles/0/..%2F..%2Fproject.json",
        "/api/exports/..%2Fproject.json",
        "/api/exports/project.json",
        "/static/..%2Fdesk.py",
        "/static/../desk.py",
    ):
        reply = web.get(path)
        assert reply.status_code == 404, (path, reply.status_code)
        assert "project.json" not in reply.text or "is not in" in reply.text
    reply = post(web, "/api/batches/s1-r1/answers", {"answers": [{"patch_id": "../../project.json", "label": "y"}]})
    assert reply.status_code == 404
    assert post(web, "/api/labels", {"answers": [{"patch_id": "/etc/passwd", "label": "y"}]}).status_code == 404


def test_a_bad_label_gets_the_message_ingest_gives(project):
    web = client(project)
    batch = project / "batches" / "s1-r1"
    info, patches = read_batch(batch)
    second = patches[1].patch_id
    reply = post(web, "/api/batches/s1-r1/answers", {"answers": [{"patch_id": second, "label": "tumour"}]})
    assert reply.status_code == 400
    assert read_labels(batch / "labels.csv", info, patches, allow_partial=True, allow_empty=True) == {}
    # The same label written into labels.csv by hand, read as ingest reads it:
    text = (batch / "labels.csv").read_text().splitlines()
    row = text[2].split(",")
    row[8] = "tumour"
    text[2] = ",".join(row)
    (batch / "labels.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(LabelsError) as caught:
        read_labels(batch / "labels.csv", info, patches, allow_partial=True)
    assert reply.json()["text"] == str(caught.value)
    assert "labels.csv patch 02 (row 3): label 'tumour' is not one of" in reply.json()["text"]


# ---- files remain the contract ------------------------------------------------------------------------------
def test_answers_land_in_labels_csv_as_given_and_two_tabs_lose_none(project):
    tabs = [client(project), client(project)]
    answers = truth_answers(project, "s1-r1")
    ids = list(answers)
    web = tabs[0]
    post(web, "/api/batches/s1-r1/answers", {"answers": [{"patch_id": ids[0], "label": "y"}]})
    info, patches = read_batch(project / "batches" / "s1-r1")
    assert read_labels(project / "batches" / "s1-r1" / "labels.csv", info, patches, allow_partial=True) == {
        ids[0]: "Tumor"
    }
    post(web, "/api/batches/s1-r1/answers", {"answers": [{"patch_id": ids[0], "label": ""}]})  # Backspace
    assert web.get("/api/batches/s1-r1").json()["patches"][0]["label"] is None

    def give(n: int) -> int:  # two tabs, each answering its half of the batch over and over, at once
        patch = ids[n % len(ids)]
        reply = post(
            tabs[n % 2], "/api/batches/s1-r1/answers", {"answers": [{"patch_id": patch, "label": answers[patch]}]}
        )
        return reply.status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(give, range(60))) == {200}
    read = read_labels(project / "batches" / "s1-r1" / "labels.csv", info, patches)  # complete, as ingest needs
    assert len(read) == len(ids)
    header = (project / "batches" / "s1-r1" / "labels.csv").read_text().splitlines()[0]
    assert header.startswith("n,patch_id,slide")  # the file's own columns are kept


def test_submit_is_ingest_and_the_next_batch_follows(project):
    web = client(project)
    assert post(web, "/api/batches/s1-r1/submit").status_code == 400  # nothing answered: ingest's refusal
    answers = answer_all(web, project, "s1-r1")
    reply = post(web, "/api/batches/s1-r1/submit")
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert result["next_batch"] == "s1-r2" and "6 labels recorded" in result["message"]
    entries = [e for e in ledger(project) if e["batch"] == "s1-r1"]
    assert sorted(e["patch_id"] for e in entries) == sorted(answers)
    assert web.get("/api/project").json()["batch"] == "s1-r2"
    status = json.loads(run("status", project, "--json"))
    assert status["sessions"][0]["round"] == 2 and status["n_labels"] == 6
    again = post(web, "/api/batches/s1-r1/submit").json()  # a second submit (a second tab) changes nothing
    assert again["changed"] is False and "already ingested" in again["message"]
    assert len(ledger(project)) == 6
    late = post(web, "/api/batches/s1-r1/answers", {"answers": [{"patch_id": next(iter(answers)), "label": "s"}]})
    assert late.status_code == 409 and "correction" in late.json()["hint"]


def test_submit_waits_for_no_lock_and_says_what_the_cli_says(project):
    web = client(project)
    answer_all(web, project, "s1-r1")
    holder = Project(project)
    with holder.lock("ingest"):
        with pytest.raises(ProjectStateError) as cli:
            Project(project).lock("relabel").__enter__()
        reply = post(web, "/api/batches/s1-r1/submit")
    assert reply.status_code == 409
    assert reply.json()["text"] == str(cli.value)
    assert "in use by `wsi-il ingest`" in reply.json()["error"]
    assert not ledger(project)
    assert post(web, "/api/batches/s1-r1/submit").status_code == 200  # the lock released: it goes through


def test_corrections_and_more_like_this_are_expert_labels_in_the_ledger(project):
    web = client(project)
    answers = answer_all(web, project, "s1-r1")
    post(web, "/api/batches/s1-r1/submit")
    first = next(iter(answers))
    before = ledger(project)
    label_now = next(e["label"] for e in before if e["patch_id"] == first)
    new = "Normal" if label_now == "Tumor" else "Tumor"
    reply = post(web, "/api/labels", {"answers": [{"patch_id": first, "label": new}]})
    assert reply.status_code == 200 and reply.json()["written"][0]["label"] == new
    last = ledger(project)[-1]
    assert last["source"] == "correction" and last["via"] == "page" and ledger(project)[:-1] == before
    info = web.get(f"/api/patches/{first}").json()
    assert info["label"] == new and [h["label"] for h in info["history"]] == [label_now, new]
    assert post(web, "/api/labels", {"answers": [{"patch_id": first, "label": "tumour"}]}).status_code == 400

    similar = web.get(f"/api/patches/{first}/similar?n=8").json()["patches"]
    waiting = {p.patch_id for p in read_batch(project / "batches" / "s1-r2")[1]}
    labelled = {e["patch_id"] for e in ledger(project)}
    assert len(similar) == 8
    assert not {p["patch_id"] for p in similar} & (waiting | labelled)
    distances = [p["distance"] for p in similar]
    assert distances == sorted(distances)
    group = [{"patch_id": p["patch_id"], "label": "Normal"} for p in similar[:5]]
    written = post(web, "/api/labels", {"answers": group}).json()["written"]
    assert len(written) == 5 and all(e["via"] == "page" for e in ledger(project)[-5:])
    status = json.loads(run("status", project, "--json"))
    assert status["n_labels"] == 6 + 5 and len(status["corrections"]) == 6


def test_slide_view_overlays_and_export(project):
    web = client(project)
    dzi = web.get("/api/slides/CMU-1-Small-Region/dzi.json").json()["Image"]
    assert (dzi["Size"]["Width"], dzi["Size"]["Height"]) == ("2220", "2967")
    tile = web.get("/api/slides/CMU-1-Small-Region/tiles/10/0_0.jpeg")
    assert tile.status_code == 200 and tile.content[:2] == b"\xff\xd8"
    assert web.get("/api/slides/CMU-1-Small-Region/tiles/10/99_0.jpeg").status_code == 404
    _, patches = read_batch(project / "batches" / "s1-r1")
    p = patches[0]
    found = web.get(f"/api/slides/CMU-1-Small-Region/patch_at?x={p.x + 5}&y={p.y + 100}").json()
    assert found["patch_id"] == p.patch_id
    assert web.get("/api/slides/CMU-1-Small-Region/patch_at?x=-5&y=3").json()["patch_id"] is None
    from PIL import Image

    batch = Image.open(io.BytesIO(web.get("/api/slides/CMU-1-Small-Region/overlays/batch.png").content))
    scale = 2967 / 2048
    assert batch.getpixel((int((p.x + 1) / scale), int((p.y + 40) / scale)))[3] == 255  # the patch's outline
    assert web.get("/api/slides/CMU-1-Small-Region/overlays/probability.png").status_code == 200
    assert post(web, "/api/export").status_code == 409  # no model yet: export's own refusal
    answer_all(web, project, "s1-r1")
    post(web, "/api/batches/s1-r1/submit")
    files = post(web, "/api/export").json()["files"]
    assert files == ["mask.geojson", "mask.png"]
    mask = web.get("/api/exports/mask.geojson")
    assert mask.status_code == 200 and json.loads(mask.content)["type"] == "FeatureCollection"
    assert (project / "exports" / "mask.png").is_file()
    context = web.get(f"/api/patches/{p.patch_id}/context.jpeg?tiles=7")
    assert Image.open(io.BytesIO(context.content)).size == (768, 768)
    assert web.get(f"/api/patches/{p.patch_id}/context.jpeg?tiles=4").status_code == 400


def test_warm_up_writes_nothing(project):
    desk = Desk(project, "cpu")
    files = {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file()}
    desk.warm_up()
    assert desk.warmup["state"] == "done" and desk.warmup["seconds"] > 0
    assert {p: p.stat().st_mtime_ns for p in project.rglob("*") if p.is_file()} == files


def test_another_host_needs_the_explicit_flag(base_project):
    out = run("review", base_project, "--host", "0.0.0.0", code=3)
    assert "--allow-remote" in out


# ---- the real server, killed ----------------------------------------------------------------------------------
def start_server(project: Path, *options: str) -> tuple[subprocess.Popen, str, httpx.Client]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "wsi_il", "review", str(project), "--port", "0", "--device", "cpu", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines = []
    while True:
        line = server.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        found = re.search(r"then open: (http://127\.0\.0\.1:(\d+)/\?token=\S+)$", line.strip())
        if found:
            break
    printed = "".join(lines)
    port = found.group(2)
    assert f"ssh -N -L {port}:127.0.0.1:{port} " in printed
    assert lines[-1].startswith("then open: ")  # the URL comes last
    server.url = found.group(1)
    web = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    assert web.get(found.group(1), follow_redirects=True).status_code == 200  # the cookie is kept
    return server, web.cookies[cookie_name(int(port))], web


def test_a_server_killed_mid_submit_loses_nothing_and_doubles_nothing(project):
    # The ingest itself is killed here: a round prepared ahead would be put in place too fast to kill half-way
    # (its commit writes in ingest's order, so a kill there is the same as one here).
    server, token, web = start_server(project, "--no-prepare-ahead")
    answers = truth_answers(project, "s1-r1")
    headers = {TOKEN_HEADER: token}
    web.post(
        "/api/batches/s1-r1/answers",
        headers=headers,
        json={"answers": [{"patch_id": p, "label": a} for p, a in answers.items()]},
    ).raise_for_status()
    threading.Thread(
        target=lambda: _ignore(lambda: web.post("/api/batches/s1-r1/submit", headers=headers)), daemon=True
    ).start()
    deadline = time.monotonic() + 60
    while not [e for e in ledger(project) if e["batch"] == "s1-r1"]:  # labels recorded: training has begun
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.005)
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=10)
    session = json.loads((project / "sessions" / "s1.json").read_text())
    assert session["round"] == 1 and not session["history"][0].get("ingested")  # killed before the round's end
    assert len(ledger(project)) == len(answers)

    server, token, web = start_server(project)  # the lock of the killed server is taken over
    try:
        reply = web.post("/api/batches/s1-r1/submit", headers={TOKEN_HEADER: token})
        assert reply.status_code == 200, reply.text
        assert reply.json()["next_batch"] == "s1-r2"
        entries = ledger(project)
        assert len(entries) == len(answers) and len({e["patch_id"] for e in entries}) == len(answers)
        server.send_signal(signal.SIGTERM)  # stops cleanly
        assert server.wait(timeout=30) == 0
        assert "review desk stopped" in server.stdout.read()
        assert not (project / "lock").exists()
    finally:
        if server.poll() is None:
            server.kill()


def _ignore(call) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass


def test_the_package_data_covers_every_static_file():
    """A non-editable install ships the page: every file under static/ matches a package-data pattern."""
    import fnmatch

    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["wsi_il.desk"]
    static = REPO / "wsi_il" / "desk" / "static"
    files = [p.relative_to(static.parent).as_posix() for p in static.rglob("*") if p.is_file()]
    assert "static/vendor/openseadragon/openseadragon.min.js" in files
    assert "static/vendor/openseadragon/LICENSE.txt" in files
    missing = [f for f in files if not any(fnmatch.fnmatchcase(f, pattern) for pattern in patterns)]
    assert not missing


def test_a_desk_on_every_address_answers_to_the_machines_names_only(base_project):
    import socket

    from wsi_il.cli import _host_names

    names = _host_names("0.0.0.0")
    assert socket.gethostname().lower() in names and "evil.example" not in names
    app = create_app(Desk(base_project, "cpu"), TOKEN, set(LOOPBACK_NAMES) | names, PORT)
    web = TestClient(app, base_url=BASE)
    web.cookies.set(cookie_name(PORT), TOKEN)
    assert web.get("/api/project", headers={"host": f"{socket.gethostname()}:{PORT}"}).status_code == 200
    assert web.get("/api/project", headers={"host": f"evil.example:{PORT}"}).status_code == 403


def test_an_answer_keeps_a_spreadsheets_file_as_it_saved_it(project):
    """A labels.csv saved by a spreadsheet (BOM, semicolons, CRLF, quotes): only the label cell changes."""
    batch = project / "batches" / "s1-r1"
    info, patches = read_batch(batch)
    rows = [line.split(",") for line in (batch / "labels.csv").read_text().splitlines()]
    text = "\r\n".join(";".join(f'"{cell}"' if n == 2 else cell for n, cell in enumerate(row)) for row in rows)
    (batch / "labels.csv").write_bytes(b"\xef\xbb\xbf" + (text + "\r\n").encode())
    web = client(project)
    reply = post(web, "/api/batches/s1-r1/answers", {"answers": [{"patch_id": patches[2].patch_id, "label": "n"}]})
    assert reply.status_code == 200 and reply.json()["labels"] == {patches[2].patch_id: "Normal"}
    after = (batch / "labels.csv").read_bytes()
    assert after.startswith(b"\xef\xbb\xbf") and b"\r\n" in after
    cells = [c for row in csv.reader(io.StringIO(text), delimiter=";") for c in row]
    now = [c for row in csv.reader(io.StringIO(after[3:].decode()), delimiter=";") for c in row]
    assert len(now) == len(cells) and [(a, b) for a, b in zip(cells, now, strict=True) if a != b] == [("", "Normal")]
    assert read_labels(batch / "labels.csv", info, patches, allow_partial=True) == {patches[2].patch_id: "Normal"}


def test_a_patch_folder_project_has_the_batch_view_without_the_slide(tmp_path):
    """Patches cut from the bundled slide into two class folders: the page labels and submits them; there is no
    slide to view, and the export is the predictions table."""
    from PIL import Image

    from wsi_il.slide import TileReader

    reader = TileReader(EXAMPLES / "CMU-1-Small-Region.svs")
    folder = tmp_path / "patches"
    for name, y in (("Tumor", 1152), ("Normal", 2304)):
        (folder / name).mkdir(parents=True)
        for n in range(6):
            Image.fromarray(reader.read(640 + 128 * n, y, 128, 128)).save(folder / name / f"{name}-{n}.png")
    reader.close()
    project = tmp_path / "p"
    run("init", project, "--patches", folder, "--weights", "random", "--epochs", "2", "--device", "cpu")
    ids = json.loads(run("status", project, "--json"))["slides"][0]
    assert ids["kind"] == "patches"
    table_ids = json.loads((project / "slides" / ids["id"] / "images.json").read_text())["ids"]
    run("query", project, "--patch", table_ids[0], "--label", "Tumor", "-k", "4", "--rounds", "2", "--device", "cpu")
    web = client(project)
    overview = web.get("/api/project").json()
    assert [s["kind"] for s in overview["slides"]] == ["patches"]
    batch = web.get("/api/batches/s1-r1").json()
    assert all(not p["has_slide"] for p in batch["patches"])
    first = batch["patches"][0]["patch_id"]
    image = web.get(f"/api/patches/{first}/context.jpeg")
    assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (128, 128)
    assert web.get(f"/api/slides/{ids['id']}/dzi.json").status_code == 404
    answers = [
        {"patch_id": p["patch_id"], "label": "Tumor" if "Tumor" in p["patch_id"] else "Normal"}
        for p in batch["patches"]
    ]
    assert post(web, "/api/batches/s1-r1/answers", {"answers": answers}).status_code == 200
    assert post(web, "/api/batches/s1-r1/submit").json()["next_batch"] == "s1-r2"
    assert post(web, "/api/export").json()["files"] == ["predictions.csv"]


def test_ctrl_c_during_the_warm_up_stops_cleanly(base_project, tmp_path):
    project = tmp_path / "cmu"
    shutil.copytree(base_project, project)
    server, _, web = start_server(project)
    web.close()
    server.send_signal(signal.SIGINT)  # the warm-up has just begun
    assert server.wait(timeout=120) == 0
    printed = server.stdout.read()
    assert "review desk stopped" in printed and "terminate called" not in printed
    assert not (project / "lock").exists()
