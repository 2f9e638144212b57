"""``glocalclip serve``: a small HTTP service (FastAPI + uvicorn, the ``serve`` extra) around a
checkpoint (PyTorch) or an exported ONNX file (ONNX Runtime, no torch loaded).

- ``POST /predict``: multipart, one or more files in the field ``files``; answers one outcome per file,
  in order: a prediction (``"ok": true``) or the reason it was refused (``"ok": false``, ``"status"``,
  ``"error"``). The schema is in docs/usage.md, "HTTP API".
- ``GET /healthz``: the model's settings, to check the service is up.
- ``GET /``: one self-contained page (``page.html``) to drop images and move a threshold slider.

Requests arriving together are scored as one batch (``batching.py``). Binds to 127.0.0.1 by default.
Every upload is bounded while it is read and decoded (``uploads.py``; the limits, timeouts and the
memory they give: docs/usage.md, "Security: the server").
The command line is ``apps/serve_cli.py``.
"""

import asyncio
import base64
import functools
import io
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional

from ..inference.images import Prediction, overlay_rgb
from ..inference.interface import ImagePredictor
from ..settings import check_settings, setting
from .batching import BatchScorer
from .uploads import BodyLimits, ClientGone, ServedImage, UploadError, decode_upload, receive_files

SERVE_EXTRA_HINT = "serving needs the serve extra: pip install 'glocalclip[serve]' (fastapi, uvicorn, python-multipart)"
OVERLAY_SIDE = 1024  # the page shows overlays small; full-size PNGs of large photos would be megabytes


@dataclass
class ServeSettings:
    """How the service runs and answers (each a ``glocalclip serve`` flag). The limits bound what
    any request can cost; docs/usage.md, "Security: the server", gives the memory they allow."""

    host: str = setting("127.0.0.1", help="address to bind: 127.0.0.1 is this machine only; 0.0.0.0 opens the "
                                          "service to the network")
    port: int = setting(8000, minimum=1, help="TCP port")
    max_upload_mb: float = setting(20.0, minimum=0, help="largest image file accepted, in MB; counted as the "
                                                         "bytes arrive, a larger file ends its request with 413")
    max_request_mb: float = setting(100.0, minimum=0, help="largest request body, in MB, counted as the bytes "
                                                           "arrive (with or without Content-Length)")
    max_files: int = setting(16, minimum=1, help="most files in one request")
    max_image_mp: float = setting(40.0, minimum=0, help="most pixels in one image, in megapixels, read from its "
                                                        "header before decoding (a 24 MP photo passes); more is "
                                                        "refused with 413")
    max_decodes: int = setting(2, minimum=1, help="images decoded (or overlays drawn) at once; each decode holds "
                                                  "4 bytes per pixel of its image, 8 if EXIF turns it")
    max_requests: int = setting(4, minimum=1, help="requests handled at once; more are answered 503 at once")
    upload_timeout_s: float = setting(60.0, minimum=0, help="a request body must arrive within this many seconds; "
                                                            "a slower or stalled upload is answered 408 and its "
                                                            "connection closed")
    header_timeout_s: float = setting(10.0, minimum=0, help="a request's headers must arrive within this many "
                                                            "seconds of its connection opening (or of the previous "
                                                            "answer on a kept-alive connection), else the connection "
                                                            "is closed; 0: no limit")
    max_batch: int = setting(8, minimum=1, help="most images scored in one forward pass; requests arriving "
                                                "together share it")
    batch_wait_ms: float = setting(5.0, minimum=0, help="how long the first waiting request waits for others "
                                                        "to join its batch, in ms")
    threshold: Optional[float] = setting(None, parse=float, help="label threshold",
                                         default_text="the one stored beside the checkpoint or in the ONNX file")

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)

    @property
    def body_limits(self) -> BodyLimits:
        return BodyLimits(file_bytes=self.max_upload_bytes, body_bytes=int(self.max_request_mb * 1e6),
                          files=self.max_files, seconds=self.upload_timeout_s)

    @property
    def max_pixels(self) -> int:
        return int(self.max_image_mp * 1e6)


def page_html() -> str:
    return resources.files("glocalclip.deploy").joinpath("page.html").read_text(encoding="utf-8")


def _png_base64(rgb) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def result_json(filename: str, pred: Prediction, image: ServedImage, threshold: Optional[float],
                value_range: tuple[float, float]) -> dict[str, Any]:
    """One image's answer: the Prediction's fields, the threshold the label used, the overlay (drawn
    at the overlay's size: the map was resized to it) and the map range its colours span."""
    h, w = image.size
    return {"filename": filename, "ok": True, "width": w, "height": h, "pred_score": pred.pred_score,
            "pred_label": pred.pred_label, "threshold": threshold, "map_max": pred.map_max,
            "map_range": list(value_range), "overlay_png": _png_base64(overlay_rgb(image.rgb, pred, value_range))}


def error_json(filename: str, error: UploadError) -> dict[str, Any]:
    return {"filename": filename, "ok": False, "status": error.status, "error": error.message}


def model_info(predictor: ImagePredictor, threshold: Optional[float]) -> dict[str, Any]:
    return {"status": "ok", "backend": predictor.backend, "weights": predictor.weights, "image_size": predictor.image_size,
            "sigma": float(predictor.sigma), "threshold": threshold,
            "map_range": list(predictor.map_value_range)}


def refusal(status: int, message: str, results: Optional[list] = None):
    """A 4xx/5xx answer; ``Connection: close`` so that a body still arriving is not read on."""
    from fastapi.responses import JSONResponse

    body: dict[str, Any] = {"detail": message}
    if results is not None:
        body["results"] = results
    return JSONResponse(body, status_code=status, headers={"Connection": "close"})


PREDICT_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


def create_app(predictor: ImagePredictor, settings: Optional[ServeSettings] = None):
    """The FastAPI application around ``predictor`` (a ``Predictor`` or an ``OnnxPredictor``: either
    is an :class:`ImagePredictor`)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse

    settings = settings or ServeSettings()
    threshold = settings.threshold if settings.threshold is not None else predictor.threshold
    # labels decided by the predictor's rule (batch-invariant, inference.images.batch_invariant_scores)
    scorer = BatchScorer(functools.partial(predictor.predict_uint8, threshold=threshold), settings.max_batch,
                         settings.batch_wait_ms)
    image_work = asyncio.Semaphore(settings.max_decodes)  # decodes and overlays: the memory of each is large
    in_flight = [0]

    @asynccontextmanager
    async def lifespan(app):
        scorer.start()
        yield
        await scorer.stop()

    app = FastAPI(title="glocalclip", lifespan=lifespan)

    async def bounded(fn, *args):
        async with image_work:
            return await asyncio.to_thread(fn, *args)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return model_info(predictor, threshold)

    @app.post("/predict", openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request):
        if in_flight[0] >= settings.max_requests:
            return refusal(503, f"busy: {settings.max_requests} requests are being handled; try again "
                                f"(glocalclip serve --max_requests)")
        in_flight[0] += 1
        try:
            return await _predict(request)
        finally:
            in_flight[0] -= 1

    async def _predict(request: Request):
        try:
            files = await receive_files(request.receive, dict(request.headers), settings.body_limits)
        except UploadError as e:
            return refusal(e.status, e.message)
        except ClientGone:
            return refusal(400, "the client closed the connection before its body arrived")
        try:
            if not files:
                return refusal(400, "no files: send one or more images in the multipart field 'files'")
            outcomes: list[Any] = []
            for f in files:  # one at a time per request; max_decodes across requests
                try:
                    outcomes.append(await bounded(decode_upload, f.data, f.filename, predictor.image_size,
                                                  settings.max_pixels, OVERLAY_SIDE))
                except UploadError as e:
                    outcomes.append(e)
                f.data.close()  # the bytes are no longer needed
        finally:
            for f in files:
                f.data.close()
        good = [x for x in outcomes if isinstance(x, ServedImage)]
        if not good:
            statuses = {e.status for e in outcomes}
            results = [error_json(f.filename, e) for f, e in zip(files, outcomes)]
            return refusal(statuses.pop() if len(statuses) == 1 else 400,
                           "; ".join(e.message for e in outcomes), results)
        preds = iter(await scorer.score([x.pixels for x in good], [x.rgb.shape[:2] for x in good],
                                        [f.filename for f, x in zip(files, outcomes) if isinstance(x, ServedImage)]))
        results = []
        for f, x in zip(files, outcomes):
            if isinstance(x, ServedImage):
                results.append(await bounded(result_json, f.filename, next(preds), x, threshold,
                                             predictor.map_value_range))
            else:
                results.append(error_json(f.filename, x))
        return {"threshold": threshold, "results": results}

    return app
