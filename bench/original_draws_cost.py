"""What replaying the original's random draws (docs/design.md §5.1) costs at ViT-L size.

    python -m bench.original_draws_cost [--repeat 3]

Each repeat runs in a fresh process, so its peak resident memory (ru_maxrss) is the replay's own
plus the imports; the import-only peak is measured first and shown beside it. Times the replay
(steps 1-3: CLIP, prompt learner, V-V surgery on throwaway modules) and one epoch's order at the
15th epoch over VisA's 2162 training images. Prints a table and writes JSON (default
bench/results/original_draws_cost.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: the sizes of ViT-L/14@336 (OpenAI) and the paper's prompt settings
VIT_L = dict(vision_width=1024, vision_layers=24, patch_size=14, grid=24, embed_dim=768, text_width=768,
             text_layers=12, vocab_size=49408, context_length=77)
PAPER_PROMPTS = dict(n_ctx=12, ab_ctx=12, depth=9, t_n_ctx=4, dpam_layer=20)

CHILD = """
import json, resource, time
import torch
from glocalclip.engine.original_draws import BackboneSizes, OriginalDraws, PromptSizes
torch.set_num_threads({threads})
import_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
draws = OriginalDraws(111, BackboneSizes(**{sizes!r}), PromptSizes(**{prompts!r}))
replay_s = time.perf_counter() - t0
t0 = time.perf_counter()
draws.epoch_batches(14, 2162, 8)
epoch_s = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(replay_s=replay_s, epoch_order_s=epoch_s, import_peak_mib=import_peak / 1024,
                      peak_mib=peak / 1024)))
"""


def measure(threads: int) -> dict:
    code = CHILD.format(threads=threads, sizes=VIT_L, prompts=PAPER_PROMPTS)
    # run from the repository root, so the child imports this checkout's package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="fresh processes to measure (the table shows each)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads in the measured process")
    p.add_argument("--out", default=str(HERE / "results" / "original_draws_cost.json"), help="JSON written here")
    args = p.parse_args()
    runs = [measure(args.threads) for _ in range(args.repeat)]
    rows = [[i + 1, f"{r['replay_s']:.2f}", f"{r['epoch_order_s'] * 1e3:.2f}", f"{r['import_peak_mib']:.0f}",
             f"{r['peak_mib']:.0f}", f"{r['peak_mib'] - r['import_peak_mib']:.0f}"] for i, r in enumerate(runs)]
    print(tabulate(rows, headers=["run", "replay s", "epoch 15 order ms", "imports MiB", "peak MiB",
                                  "replay adds MiB"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"sizes": VIT_L, "prompts": PAPER_PROMPTS, "threads": args.threads,
                                          "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
