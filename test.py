#!/usr/bin/env python
"""Zero-shot test of GlocalCLIP prompts (see README / python test.py --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from glocalclip.apps.cli import run_command, test_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("test.py", test_main))
