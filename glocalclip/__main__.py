"""``python -m glocalclip CMD ...`` is ``glocalclip CMD ...``."""
import sys

from .apps.cli import main

sys.exit(main())
