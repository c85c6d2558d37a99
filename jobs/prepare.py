"""Prepare an image dataset for aspect-ratio-bucketed training: the job users run or submit.

    python jobs/prepare.py --input IMAGES --output OUT                  # embedded local Ray
    RAY_ADDRESS=ray://head:10001 python jobs/prepare.py ...             # join a running cluster
    ray job submit --working-dir . -- python jobs/prepare.py ...        # submit to a cluster
    ray submit cluster.yaml jobs/prepare.py -- --input s3://... --output s3://...

See docs/format.md for what OUT holds.
"""

from __future__ import annotations

import sys

from pipeline.job import build_parser, main

__all__ = ["build_parser", "main"]  # the command line, read by tests and tools from this file

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
