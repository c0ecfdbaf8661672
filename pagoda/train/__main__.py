"""`python -m pagoda.train CONFIG.yaml [--set section.key=value ...]`: the form torchrun runs.

    torchrun --nproc-per-node 8 -m pagoda.train configs/pretrain/baby-gpt-shakespeare.yaml

The same as `pagoda pretrain` (which the train storey cannot import: cli sits above it).
"""

from __future__ import annotations

import argparse
import json
import sys

from pagoda.errors import PagodaError
from pagoda.train.config import add_config_arguments, load_config
from pagoda.train.trainer import pretrain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagoda.train",
                                     description="pretrain a model from a YAML config")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = pretrain(load_config(args.config, args.set))
    except PagodaError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if summary["rank"] == 0:  # under torchrun only rank 0 reports
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
