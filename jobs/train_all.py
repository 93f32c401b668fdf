"""Train every job of a config at the same time (one Ray Train TorchTrainer each), publish their
adapters, print one table; exit non-zero if any job failed. `--only image,video` picks jobs.

    ray job submit --working-dir . -- python jobs/train_all.py --config jobs/configs/demo.yaml
"""

import sys

from ddft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
