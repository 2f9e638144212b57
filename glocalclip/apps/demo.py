"""``glocalclip demo``: the whole pipeline in seconds on synthetic data and the tiny backbone."""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional, Sequence

from .cli import test_main, train_main


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    """Synthetic data in the MVTec layout -> train the tiny backbone -> test -> table + overlays."""
    p = argparse.ArgumentParser(prog="glocalclip demo", description=demo_main.__doc__)
    p.add_argument("--out", default="./demo_out")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    from ..datasets.synthetic import make_synthetic_dataset

    t0 = time.time()
    out = Path(args.out)
    data = out / "data"
    if not (data / "meta.json").is_file():
        print(f"writing a synthetic dataset (MVTec layout) to {data}")
        make_synthetic_dataset(data, n_train=2, n_test_good=16, n_test_defect=16, size=160, seed=0)
    model_flags = ["--backbone", "tiny", "--pretrained", "none", "--image_size", str(args.image_size),
                   "--features_list", "2", "4", "6", "8", "--dpam", "6", "--n_ctx", "5", "--ab_ctx", "3",
                   "--depth", "3", "--t_n_ctx", "2"]
    dev = ["--device", args.device] if args.device else []
    train_main(["--train_data_path", str(data), "--save_path", str(out / "checkpoints"), "--epoch",
                str(args.epochs), "--batch_size", "8", "--num_workers", "0"] + model_flags + dev)
    ckpt = out / "checkpoints" / f"epoch_{args.epochs}.pth"
    test_main(["--data_path", str(data), "--checkpoint_path", str(ckpt), "--save_path", str(out / "results"),
               "--sigma", "4", "--num_workers", "0", "--save_vis"] + dev)
    print(f"demo finished in {time.time() - t0:.0f}s; results in {out / 'results'}")
    return 0
