"""trainer/train.py with a log of every step, for the tests (run under torchrun like it):

    torchrun ... tests/support/logged_train.py LOG.jsonl --data OUT ...

Each rank appends one JSON line a step: its batch's keys, shape and pixel checksum, the loss,
and the sum of the trained weights (equal on every rank when DDP keeps them in step).
"""

from __future__ import annotations

import json
import sys

from recorded import Step, train

from trainer.checkpoint import trained_state
from trainer.train import parse_config


def main() -> None:
    log_path, argv = sys.argv[1], sys.argv[2:]

    def log(step: Step) -> None:
        batch = step.batch
        weights = sum(float(t.double().sum()) for t in trained_state(step.model).values())
        seen = batch.pixels if batch.pixels is not None else batch.latent_mean
        entry = {
            "rank": step.rank,
            "epoch": batch.epoch,
            "step": batch.step,
            "keys": batch.keys,
            "shape": [len(batch.keys), 3, *batch.target_size[0].tolist()],
            "loss": step.loss,
            "checksum": float(seen.double().sum()),
            "weights": weights,
            "latent": batch.latent_mean is not None,
            "text": batch.text is not None,
            "original_size": batch.original_size.tolist(),
            "captions": batch.captions,
            "target_size": batch.target_size.tolist(),
        }
        with open(log_path, "a") as file:
            file.write(json.dumps(entry) + "\n")

    train(parse_config(argv), on_step=log)


if __name__ == "__main__":
    main()
