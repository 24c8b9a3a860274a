"""``python -m gateway.sim --config FILE``: run simulated devices until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gateway.sim.config import load_sim_config
from gateway.sim.simulator import run_until_signalled


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway.sim", description=__doc__)
    ap.add_argument("--config", required=True, help="simulator YAML")
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = load_sim_config(args.config)

    asyncio.run(run_until_signalled(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
