#!/usr/bin/env python
"""Train GlocalCLIP prompts (see README / python train.py --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from glocalclip.apps.cli import run_command, train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("train.py", train_main))
