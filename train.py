#!/usr/bin/env python
"""Train GlocalCLIP prompts (see README / python train.py --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from glocalclip.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
