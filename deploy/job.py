"""Ray Job entrypoint: the same deployment, submitted to an existing Ray cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m deploy.job --config cluster.yaml [any `tandem serve` flag]

`ray job submit` runs this on the head node with RAY_ADDRESS set, so the driver
joins that cluster (never starts one). Pools are placed by Ray: give a pool
`resources: {prefill_node: 1}` or a `label_selector` in the config to pin it to
nodes started with that resource or label. `ray job stop` sends SIGTERM: the
router drains, the actors are killed, and the cluster is left as it was.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from deploy.serve_cli import add_serve_parser, run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.job")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.ray_address:
        args.ray_address = os.environ.get("RAY_ADDRESS", "auto")  # a job always joins its cluster
    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
