"""``glocalclip serve``: the command line of ``deploy/serve.py``. The model is the shared
:class:`ModelSettings` (checkpoint or ONNX file, σ, device, batch size)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..deploy.connections import server_config
from ..deploy.serve import SERVE_EXTRA_HINT, ServeSettings, create_app
from ..inference.settings import ModelSettings
from .backends import open_predictor
from .flags import add_load_flags, add_reference_flags, add_settings, new_parser, reference_of, settings_from_args, trusted


def serve_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip serve", "Serve a model over HTTP: POST /predict, GET /healthz, and a web page "
                                       "at /. Needs pip install 'glocalclip[serve]'.")
    add_settings(p, ModelSettings, fields=("checkpoint", "model", "sigma", "device", "precision"))
    add_settings(p, ServeSettings)
    add_reference_flags(p)
    add_load_flags(p)
    return p


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
    args = serve_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError(f"{SERVE_EXTRA_HINT} ({e})") from e
    settings = settings_from_args(ServeSettings, args)
    model = settings_from_args(ModelSettings, args, batch_size=settings.max_batch)
    reference, few_shot = reference_of(args)
    app = create_app(open_predictor(model, "serve", trust=trusted(args), reference=reference, few_shot=few_shot),
                     settings)
    print(f"glocalclip serve: http://{settings.host}:{settings.port}/ (POST /predict, GET /healthz)")
    try:
        uvicorn.Server(server_config(app, settings)).run()
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: uvicorn has shut down cleanly
        pass
    return 0
