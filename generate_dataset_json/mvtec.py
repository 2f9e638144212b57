"""Write ROOT/meta.json for MVTec AD (layout: docs/datasets.md).

    python generate_dataset_json/mvtec.py --root ROOT [--dry-run]
"""

import os
import sys

try:
    from glocalclip.datasets.prepare import main
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from glocalclip.datasets.prepare import main

if __name__ == "__main__":
    sys.exit(main(fixed_name="mvtec", prog="generate_dataset_json/mvtec.py"))
