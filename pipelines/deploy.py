"""Scheduled deployments of the flows.

Serve from this machine (the process stays in the foreground and runs each scheduled run itself)::

    prefect server start                                   # another terminal: API + scheduler
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.deploy retrain --cron "0 3 * * 1" --batch /surveys/inbox --dataset deepcrack

Or register the deployment with a work pool, so workers elsewhere (e.g. GPU machines with a clone
of this repository at the same path) run it: add ``--work-pool gpu``. ``prefect.yaml`` at the repo
root declares the same deployments for ``prefect deploy --all``.

Schedules need a Prefect server: a temporary local one has no scheduler, so without
``PREFECT_API_URL`` this command refuses to start instead of silently never running.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

FLOWS = {"retrain": "pipelines/retrain.py:retrain", "reproduce": "pipelines/reproduce.py:reproduce",
         "survey": "pipelines/survey.py:survey"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="flow", required=True)
    for name in FLOWS:
        p = sub.add_parser(name, help=f"schedule the {name} flow")
        p.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * 1" (Mondays 03:00)')
        p.add_argument("--timezone", default="UTC")
        p.add_argument("--name", help=f"deployment name (default: {name}-<dataset(s)>)")
        p.add_argument("--root", default=".", help="the wpcrack repository the runs use (default: .)")
        p.add_argument("--work-pool", help="register with this work pool instead of serving from here")
        if name == "retrain":
            p.add_argument("--batch", help="drop folder (crack/, no_crack/) or CSV scanned on each run")
            p.add_argument("--dataset", default="deepcrack")
            p.add_argument("--variant", default="full")
        elif name == "survey":  # the Dask cluster: $WPCRACK_DASK_ADDRESS / $WPCRACK_DASK_WORKERS where the runs run
            p.add_argument("--photos", required=True, help="survey folder (or CSV) scanned on each run: new photos only")
            p.add_argument("--out", required=True, help="the survey's output folder")
            p.add_argument("--model", default="champion")
            p.add_argument("--dataset", default="deepcrack")
        else:
            p.add_argument("--datasets", nargs="+")
            p.add_argument("--variants", nargs="+")
    return parser


def deployment(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(deployment name, flow parameters) for parsed arguments."""
    root = str(Path(args.root).resolve())
    if args.flow == "retrain":
        params = {"batch": str(Path(args.batch).resolve()) if args.batch else None,
                  "dataset": args.dataset, "variant": args.variant, "root": root}
        default = f"retrain-{args.dataset}"
    elif args.flow == "survey":
        params = {"photos": str(Path(args.photos).resolve()), "out": str(Path(args.out).resolve()),
                  "model": args.model, "dataset": args.dataset, "params": str(Path(root) / "params.yaml")}
        default = f"survey-{Path(args.photos).name}"
    else:
        params = {"datasets": args.datasets, "variants": args.variants, "root": root}
        default = "reproduce-" + "-".join(args.datasets or ["all"])
    return args.name or default, params


def _flow(name: str):
    if name == "retrain":
        from pipelines.retrain import retrain

        return retrain
    if name == "survey":
        from pipelines.survey import survey

        return survey
    from pipelines.reproduce import reproduce

    return reproduce


def main(argv: list[str] | None = None) -> int:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL

    args = build_parser().parse_args(argv)
    if not PREFECT_API_URL.value():
        print("deploy: error: schedules need a Prefect server; run `prefect server start` and "
              "export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    name, params = deployment(args)
    schedule = CronSchedule(cron=args.cron, timezone=args.timezone)
    flow = _flow(args.flow)
    if args.work_pool:
        source = flow.from_source(source=str(Path(args.root).resolve()), entrypoint=FLOWS[args.flow])
        source.deploy(name=name, work_pool_name=args.work_pool, parameters=params, schedules=[schedule],
                      tags=["wpcrack", args.flow])
        print(f"deployment {flow.name}/{name} registered with work pool {args.work_pool}; "
              f"start a worker there: prefect worker start --pool {args.work_pool}")
        return 0
    flow.serve(name=name, parameters=params, schedules=[schedule], tags=["wpcrack", args.flow])
    return 0


if __name__ == "__main__":
    sys.exit(main())
