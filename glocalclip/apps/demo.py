"""``glocalclip demo``: the whole pipeline in seconds on synthetic data and the tiny backbone."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from ..datasets.synthetic import make_synthetic_dataset
from .cli import test_main, train_main
from .flags import new_parser


#: what the demo's model is, said before and after its numbers
MODEL_NOTE = ("demo model: the tiny backbone with random weights (no CLIP weights), prompts trained for a few "
              "epochs on synthetic textures. It shows that the pipeline runs; its scores on real photos mean "
              "nothing (expect every photo to come out anomalous). Real use: train.py/test.py with ViT-L-14-336.")


def demo_parser() -> argparse.ArgumentParser:
    p = new_parser("glocalclip demo", "Synthetic data in the MVTec layout -> train the tiny backbone -> test "
                                      "-> table + overlays.")
    p.add_argument("--out", default="./demo_out", help="folder for the data, checkpoints and results")
    p.add_argument("--epoch", type=int, default=8, help="training epochs (train.py's flag name)")
    p.add_argument("--epochs", type=int, dest="epoch", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--image_size", type=int, default=224, help="side of the square input in pixels")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: a GPU if present)")
    return p


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """Synthetic data in the MVTec layout -> train the tiny backbone -> test -> table + overlays."""
    args = demo_parser().parse_args(argv)
    t0 = time.time()
    print(MODEL_NOTE)
    out = Path(args.out)
    data = out / "data"
    if not (data / "meta.json").is_file():
        print(f"writing a synthetic dataset (MVTec layout) to {data}")
        make_synthetic_dataset(data, n_train=2, n_test_good=16, n_test_defect=16, size=160, seed=0)
    # the tiny backbone brings its own layers, prompt lengths and random weights (BACKBONE_DEFAULTS)
    model_flags = ["--backbone", "tiny", "--image_size", str(args.image_size)]
    dev = ["--device", args.device] if args.device else []
    # a demo rerun starts its run afresh (train.py refuses a folder of an earlier run without --overwrite)
    train_main(["--train_data_path", str(data), "--save_path", str(out / "checkpoints"), "--epoch",
                str(args.epoch), "--batch_size", "8", "--num_workers", "0", "--overwrite"] + model_flags + dev)
    ckpt = out / "checkpoints" / f"epoch_{args.epoch}.pth"
    test_main(["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(out / "results"),
               "--sigma", "4", "--num_workers", "0", "--save_vis"] + dev)
    print(f"demo finished in {time.time() - t0:.0f}s; results in {out / 'results'}")
    print(MODEL_NOTE)
    return 0
