"""Build or import the base, write the synthetic kitchen when configured, and prepare every
modality the config's jobs train on with Ray Data, reading from the store.

    ray job submit --working-dir . -- python jobs/prepare_data.py --config jobs/configs/demo.yaml
"""

import sys

from ddft.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "prepare", *sys.argv[1:]]))
