#!/usr/bin/env python
"""Fine-tune vs scratch vs frozen over seeds: one command for the comparison table and figure.

    python scripts/compare.py [--experiments LIST] [--seeds LIST] [--sweep-dir DIR] [--out DIR] [overrides ...]
    python scripts/compare.py --from DIR [--experiments LIST] [--seeds LIST] [--out DIR]

The logic lives in ``finetune.compare``; ``--help`` lists every flag.
"""

import sys

from finetune.compare import main

if __name__ == "__main__":
    sys.exit(main())
