"""Score the base and each DDFT adapter on held-out data per modality; write the table into
the store (eval/<time>.md and .json) and each adapter's scores into its manifest.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/demo.yaml
"""

import sys

from ddft.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
