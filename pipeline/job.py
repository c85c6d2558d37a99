"""Prepare an image dataset for aspect-ratio-bucketed training (`arb-prepare`, jobs/prepare.py).

    arb-prepare --input IMAGES --output OUT             # embedded local Ray
    RAY_ADDRESS=ray://head:10001 arb-prepare ...        # join a running cluster

On a cluster, submit the script instead (`ray job submit ... -- python jobs/prepare.py ...`,
`ray submit cluster.yaml jobs/prepare.py -- ...`). See docs/format.md for what OUT holds.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from pipeline.buckets import MODEL_GRIDS
from pipeline.cli import HelpFormatter, add_options, check, option, parse
from pipeline.config import RAY, PrepareConfig
from pipeline.errors import UsageError


@dataclass(frozen=True)
class RayOptions:
    """Where the job runs: no setting of the output, so not in PrepareConfig."""

    ray_address: str = option(
        lambda: os.environ.get("RAY_ADDRESS", ""),
        "a running cluster to join ($RAY_ADDRESS); none: an embedded local Ray",
        group=RAY,
    )
    num_cpus: int | None = option(
        None, "CPUs of the embedded local Ray (none: all of this machine's)", group=RAY
    )

    def __post_init__(self) -> None:
        check(self, {"num_cpus": (self.num_cpus is None or self.num_cpus >= 1, "must be >= 1")})


def build_parser(
    description: str = __doc__, argv: list[str] | None = None
) -> argparse.ArgumentParser:
    """The command line: one option per field of the job's configs, in groups; the bucket
    options' defaults are those of the `--model` family that `argv` names."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_options(parser, PrepareConfig, RayOptions)
    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--model", default="sd")
    model = family.parse_known_args(argv)[0].model
    parser.set_defaults(**MODEL_GRIDS.get(model, {}))  # an unknown one: refused by name below
    return parser


def main(argv: list[str] | None = None, description: str = __doc__) -> int:
    """Run the job the command line asks for: prepare --input into --output, or only add the
    latents of --vae, or the latents and text of --pretrained, to a prepared --output."""
    config, where = parse(build_parser(description, argv), argv, PrepareConfig, RayOptions)
    from pipeline.format import OutputDir  # here: --help answers at once
    from pipeline.inputs import absolute, check_separate, resolve_input
    from pipeline.latents import vae_folder
    from pipeline.text_cache import text_parts

    try:  # local mistakes are answered before Ray starts
        source = None
        if config.input:
            source = resolve_input(
                config.input, config.caption_field, config.image_column, config.caption_column
            )
            check_separate(source, config.output)
        if config.vae:
            vae_folder(config.vae)
        if config.pretrained:
            vae_folder(config.pretrained)
            text_parts(config.pretrained, config.model)
    except UsageError as error:
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    import ray  # here, not at the top: --help and the checks above answer at once

    from pipeline.prepare import add_companions, run
    from pipeline.report import summary

    if where.ray_address:
        ray.init(address=where.ray_address, log_to_driver=False)
    else:
        # Ray turns token auth on for a new local cluster (it listens on every interface, not on
        # loopback only) and warns on every run that it did: keep the auth, drop the notice.
        # Not RAY_AUTH_MODE=token: `ray submit` lands here too, joining a cluster without auth.
        import logging

        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        ray.init(num_cpus=where.num_cpus, include_dashboard=False, log_to_driver=False)
    out = OutputDir(absolute(config.output))
    try:
        manifest = run(config, source) if config.input else add_companions(out, config)
    except UsageError as error:  # a refused OUT, an input with nothing to prepare
        print(f"prepare: {error}", file=sys.stderr)
        return 2
    print(summary(out.read_json(out.path("stats.json")), len(manifest.shards), out.uri))
    return 0
