"""glocalclip serve: the API through FastAPI's test client, the batching of concurrent requests, and
the page in a real headless Chromium (Debian's, driven by Playwright)."""
from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from glocalclip import GlocalCLIP, Predictor
from glocalclip.inference.images import Prediction

from conftest import DEPLOY_SIGMA, DEPLOY_THRESHOLD, tiny_config

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx: pip install -e '.[test]'")
from fastapi.testclient import TestClient  # noqa: E402

from glocalclip.deploy.batching import BatchScorer  # noqa: E402
from glocalclip.apps.serve_cli import serve_main  # noqa: E402
from glocalclip.deploy.serve import ServeSettings, create_app  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="module")
def predictor():
    import torch

    torch.manual_seed(0)
    return Predictor(GlocalCLIP(tiny_config()).eval(), threshold=DEPLOY_THRESHOLD, sigma=DEPLOY_SIGMA,
                     device="cpu")


def png_bytes(path) -> bytes:
    return Path(path).read_bytes()


def files_field(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def la_tiff() -> bytes:
    """A grey TIFF with alpha: what Pillow makes of it depends on its version (see its use)."""
    buf = io.BytesIO()
    Image.new("LA", (16, 16), (100, 200)).save(buf, "TIFF")
    unassociated = bytes.fromhex("5201 0300 01000000 0200")  # tag 338 ExtraSamples = 2
    data = buf.getvalue()
    assert data.count(unassociated) == 1
    return data.replace(unassociated, bytes.fromhex("5201 0300 01000000 0100"))


# ---------------------------------------------------------------------------- API
def test_healthz_and_page(predictor):
    with TestClient(create_app(predictor)) as client:
        info = client.get("/healthz").json()
        assert info == {"status": "ok", "backend": "pytorch", "weights": "float32", "image_size": 112, "sigma": DEPLOY_SIGMA,
                        "threshold": DEPLOY_THRESHOLD, "map_range": [0.0, 4.0]}
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="threshold"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN
        assert "<script src" not in page.text and "<link" not in page.text


def test_several_images_in_one_request_score_as_predict_does(predictor, deploy_images):
    with TestClient(create_app(predictor)) as client:
        resp = client.post("/predict", files=files_field(*[(p.name, png_bytes(p)) for p in deploy_images]))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["threshold"] == DEPLOY_THRESHOLD
    want = predictor.predict([str(p) for p in deploy_images])
    assert [r["filename"] for r in body["results"]] == [p.name for p in deploy_images]
    for r, w, path in zip(body["results"], want, deploy_images):
        assert r["pred_score"] == w.pred_score and r["map_max"] == w.map_max  # same code path: exact
        assert r["pred_label"] == int(w.pred_score >= DEPLOY_THRESHOLD) and r["threshold"] == DEPLOY_THRESHOLD
        overlay = Image.open(io.BytesIO(base64.b64decode(r["overlay_png"])))
        assert overlay.format == "PNG" and overlay.size == Image.open(path).size == (r["width"], r["height"])


def test_explicit_threshold_sets_the_labels(predictor, deploy_images):
    score = predictor.predict(str(deploy_images[0])).pred_score
    for thr, label in ((score, 1), (score + 1e-3, 0)):
        with TestClient(create_app(predictor, ServeSettings(threshold=thr))) as client:
            r = client.post("/predict", files=files_field(("a.png", png_bytes(deploy_images[0])))).json()
        assert r["threshold"] == thr and r["results"][0]["pred_label"] == label


def test_bad_uploads_get_4xx_with_a_message_and_the_server_goes_on(predictor, deploy_images, monkeypatch):
    good = png_bytes(deploy_images[0])
    bad = {
        "notes.txt": (b"this is not an image \x00\x01", 415, "not an image"),
        "cut.png": (good[: len(good) // 2], 400, "truncated"),
        "empty.png": (b"", 400, "empty"),
        "big.png": (good + b"\0" * 3000, 413, "larger than this server's limit"),
    }
    settings = ServeSettings(max_upload_mb=(len(good) + 1000) / 1e6)
    with TestClient(create_app(predictor, settings)) as client:
        for name, (data, status, message) in bad.items():
            resp = client.post("/predict", files=files_field((name, data)))
            assert resp.status_code == status, (name, resp.text)
            assert name in resp.json()["detail"] and message in resp.json()["detail"]
        # grey with associated alpha: some Pillow versions read it, others refuse it (and a few opened it as
        # mode "La", which cannot become RGB); whichever, an answer naming the file, never a server error
        resp = client.post("/predict", files=files_field(("grey.tif", la_tiff())))
        if resp.status_code == 200:
            assert [r["filename"] for r in resp.json()["results"]] == ["grey.tif"]
        else:
            assert resp.status_code in (400, 415) and "grey.tif" in resp.json()["detail"], resp.text
        # one bad file among good ones: the good one is scored, the bad one answered beside it
        resp = client.post("/predict", files=files_field(("ok.png", good), ("empty.png", b"")))
        assert resp.status_code == 200 and [r["ok"] for r in resp.json()["results"]] == [True, False]
        assert resp.json()["results"][1]["status"] == 400 and "empty" in resp.json()["results"][1]["error"]
        assert client.post("/predict").status_code == 400  # no files at all
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb, in miniature
        resp = client.post("/predict", files=files_field(("bomb.png", good)))
        assert resp.status_code == 413 and "too many pixels" in resp.json()["detail"]
        monkeypatch.undo()
        resp = client.post("/predict", files=files_field(("ok.png", good)))
        assert resp.status_code == 200 and len(resp.json()["results"]) == 1


def test_onnx_backend_serves_the_file(tiny_onnx, deploy_images):
    from glocalclip.deploy import OnnxPredictor

    onnx_predictor = OnnxPredictor(tiny_onnx)
    with TestClient(create_app(onnx_predictor)) as client:
        assert client.get("/healthz").json()["backend"] == "onnxruntime"
        body = client.post("/predict", files=files_field(*[(p.name, png_bytes(p)) for p in deploy_images])).json()
    want = onnx_predictor.predict([str(p) for p in deploy_images])
    assert [r["pred_score"] for r in body["results"]] == [w.pred_score for w in want]


def test_serve_refuses_sigma_with_an_onnx_file(tiny_onnx):
    with pytest.raises(ValueError, match="σ=4, built into the file"):
        serve_main(["--model", str(tiny_onnx), "--sigma", "2"])


# ---------------------------------------------------------------------------- batching
def fake_scorer(calls: list[int], fail_first: bool = False):
    def score(pixels, sizes, names):
        calls.append(len(pixels))
        if fail_first and len(calls) == 1:
            raise RuntimeError("out of memory")
        return [Prediction(n, float(p[0, 0, 0]), None, 0.0, np.zeros(s, np.float32))
                for p, s, n in zip(pixels, sizes, names)]
    return score


def run_requests(scorer: BatchScorer, counts: list[int]) -> list:
    """Send requests of ``counts`` images at once; each image's pixel value is its request index."""
    async def main():
        scorer.start()
        try:
            jobs = [scorer.score([np.full((4, 4, 3), i, np.uint8)] * k, [(2, 3)] * k, [f"r{i}"] * k)
                    for i, k in enumerate(counts)]
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            await scorer.stop()
    return asyncio.run(main())


def test_requests_arriving_together_are_one_batch_up_to_the_limit():
    calls: list[int] = []
    answers = run_requests(BatchScorer(fake_scorer(calls), max_batch=8, wait_ms=200), [1, 1, 1])
    assert calls == [3]  # three requests, one forward pass
    assert [[p.image_path for p in a] for a in answers] == [["r0"], ["r1"], ["r2"]]  # each gets its own
    calls.clear()
    answers = run_requests(BatchScorer(fake_scorer(calls), max_batch=2, wait_ms=200), [1, 1, 1, 3])
    assert calls == [2, 2, 2] and sum(calls) == 6  # never more than max_batch per pass
    assert [[p.pred_score for p in a] for a in answers] == [[0.0], [1.0], [2.0], [3.0, 3.0, 3.0]]


def test_a_failed_batch_answers_its_requests_and_the_next_one_works():
    calls: list[int] = []
    scorer = BatchScorer(fake_scorer(calls, fail_first=True), max_batch=4, wait_ms=50)

    async def main():
        scorer.start()
        try:
            first = await asyncio.gather(scorer.score([np.zeros((4, 4, 3), np.uint8)], [(4, 4)], ["a"]),
                                         return_exceptions=True)
            second = await scorer.score([np.ones((4, 4, 3), np.uint8)], [(4, 4)], ["b"])
            return first, second
        finally:
            await scorer.stop()
    first, second = asyncio.run(main())
    assert isinstance(first[0], RuntimeError) and "out of memory" in str(first[0])
    assert second[0].image_path == "b" and calls == [1, 1]


# ---------------------------------------------------------------------------- the page, in a browser
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture()
def live_server(tiny_onnx):
    """The ONNX-backed app on a free localhost port, in a thread."""
    uvicorn = pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")
    from glocalclip.deploy import OnnxPredictor

    server = uvicorn.Server(uvicorn.Config(create_app(OnnxPredictor(tiny_onnx)), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture()
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        try:
            chromium = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        except Exception as e:  # noqa: BLE001 - no browser here: say so in the skip
            pytest.skip(f"headless Chromium (/usr/bin/chromium, Debian's chromium package) could not start: {e}")
        yield chromium
        chromium.close()


def labels(page) -> list[str]:
    return page.locator(".card .label").all_inner_texts()


@pytest.mark.slow
def test_page_scores_uploads_and_the_slider_flips_labels(live_server, browser, deploy_images, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(live_server)
    page.wait_for_function("document.getElementById('model').textContent.includes('onnxruntime')")
    assert page.input_value("#threshold") == str(DEPLOY_THRESHOLD)  # the stored threshold

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#files", str(bad))
    page.wait_for_selector("#status.error")
    assert "415" in page.inner_text("#status") and "notes.png" in page.inner_text("#status")

    page.set_input_files("#files", [str(p) for p in deploy_images])
    page.wait_for_function(f"document.querySelectorAll('.card').length === {len(deploy_images)}")
    scores = page.locator(".card").evaluate_all("cards => cards.map(c => Number(c.dataset.score))")
    assert len(scores) == len(deploy_images) and all(0 <= s <= 1 for s in scores)
    assert labels(page) == ["anomalous" if s >= DEPLOY_THRESHOLD else "normal" for s in scores]

    slider = page.locator("#threshold")
    slider.focus()
    page.keyboard.press("Home")  # threshold 0: everything is anomalous
    assert page.input_value("#threshold") == "0" and set(labels(page)) == {"anomalous"}
    page.keyboard.press("End")  # threshold at the top: nothing is
    assert set(labels(page)) == {"normal"}
    middle = float(np.median(scores))  # between the scores: the labels split there
    slider.evaluate("(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(middle))
    assert labels(page) == ["anomalous" if s >= float(page.input_value("#threshold")) else "normal" for s in scores]
    assert set(labels(page)) == {"anomalous", "normal"}
    assert page.inner_text("#threshold-value") == f"{float(page.input_value('#threshold')):.3f}"

    # good and bad files in one upload: a card each, the bad one red with its reason; a colour bar per card
    page.set_input_files("#files", [str(deploy_images[0]), str(bad), str(deploy_images[1])])
    page.wait_for_function(f"document.querySelectorAll('.card').length === {len(deploy_images) + 2}")
    errors = page.locator(".error-card").all_inner_texts()
    assert len(errors) == 2 and "notes.png" in errors[0] and "415" in errors[0] and "not an image" in errors[0]
    assert "1 not scored" in page.inner_text("#status") and "error" not in page.get_attribute("#status", "class")
    bars = page.locator(".card .colorbar").all_inner_texts()
    assert len(bars) == len(deploy_images) + 2 and all("map 0.0" in b and "4.0" in b for b in bars)
    assert page.locator(".card .colorbar .bar").first.bounding_box()["width"] > 100

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve_page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the page: {shot}")
    assert Image.open(shot).size[0] == 1100
