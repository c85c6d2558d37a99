"""The console commands `arb-train` and `arb-sample` (pyproject.toml's [project.scripts]): the
command lines of trainer/train.py and trainer/sample.py, installed on the PATH.

    arb-train --data OUT                        # one process
    arb-train --nproc-per-node 8 --data OUT     # 8 ranks on this machine, through torchrun's
                                                # launcher; a mistake is one line, exit 2
    arb-sample --prompt "..." --out image.png

Nothing heavy is imported before the command line is parsed: `--help` answers at once.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

from trainer.config import parse_config
from trainer.sample_config import parse_sample

HERE = Path(__file__).resolve().parent
LAUNCH = (
    "\n\narb-train takes one more option, --nproc-per-node N: N ranks on this machine through "
    "torchrun's launcher (torchrun itself for several machines)."
)


def _docstring(script: str) -> str:
    """A module's docstring read without importing it (its imports take seconds)."""
    return ast.get_docstring(ast.parse((HERE / script).read_text()), clean=False) or ""


def train(argv: list[str] | None = None) -> int:
    """`arb-train`: trainer/train.py, in this process or on --nproc-per-node ranks."""
    launcher = argparse.ArgumentParser(add_help=False)
    launcher.add_argument("--nproc-per-node", type=int, default=1)
    known, rest = launcher.parse_known_args(sys.argv[1:] if argv is None else argv)
    config = parse_config(rest, _docstring("train.py") + LAUNCH)
    from trainer.train import main

    if known.nproc_per_node <= 1:
        return main(config)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from pipeline.errors import UsageError
    from trainer.train import check_usage

    try:  # the mistakes every rank would make, answered once before any rank starts
        check_usage(config)
    except UsageError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    arguments = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={known.nproc_per_node}", str(HERE / "train.py"), *rest]
    )
    try:
        run(arguments)
    except ChildFailedError as failed:  # the ranks said what went wrong: no launcher traceback
        return failed.get_first_failure()[1].exitcode or 1
    return 0


def sample(argv: list[str] | None = None) -> int:
    """`arb-sample`: trainer/sample.py."""
    config = parse_sample(argv, _docstring("sample.py"))
    from trainer.sample import main

    main(config)
    return 0
