"""``glocalclip serve``: a small HTTP service (FastAPI + uvicorn, the ``serve`` extra) around a
checkpoint (PyTorch) or an exported ONNX file (ONNX Runtime, no torch loaded).

- ``POST /predict``: multipart, one or more files in the field ``files``; answers
  ``{"threshold", "results": [{"filename", "width", "height", "pred_score", "pred_label", "threshold",
  "map_max", "overlay_png"}]}`` (``overlay_png``: base64 PNG of the heat map over the image, at most
  1024 px on its long side). Bad uploads get a 4xx with ``{"detail": message}``.
- ``GET /healthz``: the model's settings, to check the service is up.
- ``GET /``: one self-contained page (``page.html``) to drop images and move a threshold slider.

Requests arriving together are scored as one batch (``batching.py``). Binds to 127.0.0.1 by default.
"""

import argparse
import asyncio
import base64
import io
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Optional, Sequence

from ..apps.predict_io import LoadedImage, Prediction, check_model_source, label_of, overlay_rgb
from .batching import BatchScorer
from ..apps.flags import add_settings, new_parser, settings_from_args
from ..model.config import PRECISIONS
from ..settings import check_settings, setting
from .uploads import UploadError, decode_upload

SERVE_EXTRA_HINT = "serving needs the serve extra: pip install 'glocalclip[serve]' (fastapi, uvicorn, python-multipart)"
OVERLAY_SIDE = 1024  # the page shows overlays small; full-size PNGs of large photos would be megabytes
MAX_FILES = 32  # files per request; with the per-image limit this bounds a request's body


@dataclass
class ServedModel:
    """Which model ``glocalclip serve`` scores with (flags; exactly one of checkpoint and model)."""

    checkpoint: Optional[str] = setting(None, help="our checkpoint, scored with PyTorch; or give --model")
    model: Optional[str] = setting(None, help="an ONNX file from `glocalclip export`, scored with ONNX Runtime "
                                              "(no torch)")
    sigma: Optional[float] = setting(None, parse=float, help="--checkpoint only: Gaussian smoothing of the maps",
                                     default_text="the σ test.py scored the checkpoint with, else 8")
    device: Optional[str] = setting(None, help="cpu or cuda", default_text="--checkpoint: the GPU if present; "
                                                                           "--model: the CPU")
    precision: Optional[str] = setting(None, choices=PRECISIONS,
                                       help="--checkpoint only: the model's precision (docs/speed.md: bf16 is "
                                            "faster on CPUs with bf16 units and moves scores by about 1e-2)",
                                       default_text="the checkpoint's, fp32 unless set when training")

    def __post_init__(self) -> None:
        check_settings(self)
        check_model_source(self.checkpoint, self.model, "serve")
        if self.model is not None and self.sigma is not None:
            raise ValueError("--sigma applies to --checkpoint; an ONNX file has its σ built in "
                             "(glocalclip export --sigma)")
        if self.model is not None and self.precision is not None:
            raise ValueError("--precision applies to --checkpoint; an ONNX file is computed in float32")


@dataclass
class ServeSettings:
    """How the service runs and answers (each a ``glocalclip serve`` flag)."""

    host: str = setting("127.0.0.1", help="address to bind: 127.0.0.1 is this machine only; 0.0.0.0 opens the "
                                          "service to the network")
    port: int = setting(8000, minimum=1, help="TCP port")
    max_upload_mb: float = setting(20.0, minimum=0, help="largest image file accepted, in MB")
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


def page_html() -> str:
    return resources.files("glocalclip.deploy").joinpath("page.html").read_text(encoding="utf-8")


def _png_base64(rgb) -> str:
    from PIL import Image

    im = Image.fromarray(rgb)
    im.thumbnail((OVERLAY_SIDE, OVERLAY_SIDE), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def result_json(pred: Prediction, loaded: LoadedImage, threshold: Optional[float],
                value_range: tuple[float, float]) -> dict[str, Any]:
    """One image's answer: the Prediction's fields, the threshold the label used, the overlay."""
    h, w = loaded.size
    return {"filename": pred.image_path, "width": w, "height": h, "pred_score": pred.pred_score,
            "pred_label": label_of(pred.pred_score, threshold), "threshold": threshold,
            "map_max": pred.map_max,
            "overlay_png": _png_base64(overlay_rgb(loaded.rgb, pred, value_range))}


def model_info(predictor, threshold: Optional[float]) -> dict[str, Any]:
    backend = "onnxruntime" if hasattr(predictor, "metadata") else "pytorch"
    return {"status": "ok", "backend": backend, "image_size": predictor.image_size,
            "sigma": float(predictor.sigma), "threshold": threshold,
            "map_range": list(predictor.map_value_range)}


async def _read_uploads(files, settings: ServeSettings, image_size: int) -> list[LoadedImage]:
    from fastapi import HTTPException

    if not files:
        raise HTTPException(400, "no files: send one or more images in the multipart field 'files'")
    if len(files) > MAX_FILES:
        raise HTTPException(413, f"{len(files)} files in one request; at most {MAX_FILES}")
    loaded = []
    for f in files:
        data = await f.read(settings.max_upload_bytes + 1)
        try:  # decoding a large photo takes a while: off the event loop
            item = await asyncio.to_thread(decode_upload, data, f.filename or "upload", image_size,
                                           settings.max_upload_bytes)
        except UploadError as e:
            raise HTTPException(e.status, e.message) from None
        item.path = f.filename or "upload"
        loaded.append(item)
    return loaded


def create_app(predictor, settings: Optional[ServeSettings] = None):
    """The FastAPI application around ``predictor`` (a ``Predictor`` or an ``OnnxPredictor``)."""
    from fastapi import FastAPI, File, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    settings = settings or ServeSettings()
    threshold = settings.threshold if settings.threshold is not None else predictor.threshold
    scorer = BatchScorer(predictor.predict_uint8, settings.max_batch, settings.batch_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        scorer.start()
        yield
        await scorer.stop()

    app = FastAPI(title="glocalclip", lifespan=lifespan)
    body_limit = settings.max_upload_bytes * MAX_FILES + 1_000_000

    @app.middleware("http")
    async def refuse_huge_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > body_limit:
            return JSONResponse({"detail": f"request body of {int(length) / 1e6:.0f} MB is over the limit of "
                                           f"{body_limit / 1e6:.0f} MB"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html()

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return model_info(predictor, threshold)

    @app.post("/predict")
    async def predict(files: list[UploadFile] = File(default=[])) -> dict[str, Any]:
        loaded = await _read_uploads(files, settings, predictor.image_size)
        preds = await scorer.score([x.pixels for x in loaded], [x.size for x in loaded], [x.path for x in loaded])
        results = await asyncio.to_thread(lambda: [result_json(p, x, threshold, predictor.map_value_range)
                                                    for p, x in zip(preds, loaded)])
        return {"threshold": threshold, "results": results}

    return app


# ---------------------------------------------------------------------------- CLI
def serve_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip serve", "Serve a model over HTTP: POST /predict, GET /healthz, and a web page "
                                       "at /. Needs pip install 'glocalclip[serve]'.")
    add_settings(p, ServedModel)
    add_settings(p, ServeSettings)
    return p


def build_predictor(source: ServedModel, max_batch: int):
    """The model to serve, with the threshold stored beside it."""
    if source.model is not None:
        from .runtime import OnnxPredictor

        return OnnxPredictor(source.model, batch_size=max_batch, device=source.device)
    from ..apps.predict import Predictor

    # σ not given: the one test.py scored the checkpoint with, which its stored threshold belongs to
    precision = {} if source.precision is None else {"precision": source.precision}
    return Predictor.from_checkpoint(source.checkpoint, device=source.device, sigma=source.sigma,
                                     batch_size=max_batch, **precision)


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    args = serve_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError(f"{SERVE_EXTRA_HINT} ({e})") from e
    settings = settings_from_args(ServeSettings, args)
    app = create_app(build_predictor(settings_from_args(ServedModel, args), settings.max_batch), settings)
    print(f"glocalclip serve: http://{settings.host}:{settings.port}/ (POST /predict, GET /healthz)")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    return 0
