"""How fast can loader workers hand batches to the main process, with nothing to decode?

    python -m bench.loader_handover [--workers 1 2 4] [--images 1024] [--size 518]

Each item is a ready image [3, S, S] and mask [S, S], as float32 (the normalised tensors earlier
versions handed over) or uint8 (what testing and training hand over now; the device normalises).
The rate is the ceiling the handover alone puts on any pipeline using that loader. Prints a table
and writes JSON (default bench/results/loader_handover.json).
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader, Dataset

from glocalclip.datasets import collate

from .common import RESULTS_DIR, write_report


class ReadyItems(Dataset):
    """Items already decoded and resized: only the copy into the batch and the handover remain."""

    def __init__(self, n: int, size: int, dtype: torch.dtype):
        self.n, self.size, self.dtype = n, size, dtype

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        s = self.size
        return {"index": i, "image": torch.full((3, s, s), i % 251, dtype=self.dtype),
                "mask": torch.zeros((s, s), dtype=self.dtype), "label": i % 2, "has_mask": True,
                "img_path": f"{i}.png", "cls_name": "c"}


def rate(n: int, size: int, dtype: torch.dtype, workers: int, batch: int) -> float:
    loader = DataLoader(ReadyItems(n, size, dtype), batch_size=batch, num_workers=workers, collate_fn=collate,
                        **({"prefetch_factor": 4} if workers else {}))
    t0 = time.time()
    seen = 0
    for b in loader:
        seen += len(b["image"])
        float(b["image"][-1, 0, 0, 0])  # touch the batch as a consumer would
    return seen / (time.time() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts to time")
    p.add_argument("--images", type=int, default=1024, help="items handed over per measurement")
    p.add_argument("--size", type=int, default=518, help="image side in pixels")
    p.add_argument("--batch", type=int, default=16, help="batch size")
    p.add_argument("--json", default=str(RESULTS_DIR / "loader_handover.json"), help="where to write the results")
    args = p.parse_args()
    rows = []
    for w in args.workers:
        f32 = rate(args.images, args.size, torch.float32, w, args.batch)
        u8 = rate(args.images, args.size, torch.uint8, w, args.batch)
        rows.append({"workers": w, "float32_images_per_s": f32, "uint8_images_per_s": u8, "speedup": u8 / f32})
    print(tabulate([[r["workers"], f"{r['float32_images_per_s']:.0f}", f"{r['uint8_images_per_s']:.0f}",
                     f"{r['speedup']:.1f}x"] for r in rows],
                   headers=["workers", "float32 handover img/s", "uint8 handover img/s", "uint8 / float32"],
                   tablefmt="github"))
    write_report({"cpus": os.cpu_count(), "size": args.size, "batch": args.batch, "images": args.images,
                  "rows": rows}, args.json)


if __name__ == "__main__":
    main()
