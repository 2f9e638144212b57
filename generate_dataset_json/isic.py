"""Write ROOT/meta.json for ISIC 2016 skin lesions (layout: docs/datasets.md).

    python generate_dataset_json/isic.py --root ROOT [--dry-run]
"""

import os
import sys

try:
    from glocalclip.datasets.prepare import main
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from glocalclip.datasets.prepare import main

if __name__ == "__main__":
    sys.exit(main(fixed_name="ISIC", prog="generate_dataset_json/isic.py"))
