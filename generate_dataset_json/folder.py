"""Write ROOT/meta.json for your own images (see docs/datasets.md).

    python generate_dataset_json/folder.py --root R --normal DIR --abnormal DIR [--masks DIR [--missing_masks skip]]
        --class-name NAME [--dry-run]
"""

import os
import sys

try:
    from glocalclip.datasets.prepare import main
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from glocalclip.datasets.prepare import main

if __name__ == "__main__":
    sys.exit(main(fixed_name="folder", prog="generate_dataset_json/folder.py"))
