"""``kquant-job rollback``: make an earlier set of an output or promotion prefix current
again, fixed names included (:mod:`kquant_job.sets.rollback`)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kquant_api import REASON_EXIT_CODE
from kquant_api.spec import StorageConfig
from kquant_job.cli_preview import add_endpoint_argument
from kquant_job.errors import KquantError

LOG = logging.getLogger("kquant")

ROLLBACK_EXAMPLES = """examples:
  kquant-job rollback s3://models/silero-vad/production/          the set before the current
  kquant-job rollback s3://models/silero-vad/production/ --again  one set further back
  kquant-job rollback file:///srv/models/prod/ --to 20261207T101500Z-1a2b3c4d
  kquant-job rollback file:///srv/models/prod/ --from 20261207T101500Z-1a2b3c4d
  kquant-job rollback file:///srv/models/.kquant/beside-fp16/     an output beside originals

reruns: run again after a kill, or after it finished, the same command finishes the
rollback it made (fixed names, clean-up) and goes no further until a job publishes again:
"rollback already done: ...". --again goes one set further back; a rerun of it after a kill
may go one set more, so a script names the set: --to SET (the set to restore) or --from SET
(the set to leave: one set back from it, and nothing more once it was left).
"""


def add_rollback_parser(sub: Any) -> None:
    """Register the ``rollback`` sub-command."""
    cmd = sub.add_parser(
        "rollback",
        help="make an earlier set of a prefix current again",
        description="Point a prefix's manifest.json at a set it still keeps (the one before "
        "the current one, or --to SET) and bring its fixed names in step. The write is "
        "conditional: a job committing meanwhile wins, and the rollback fails saying so. A "
        "later run of a newer generation publishes again: revert its spec in Git to keep "
        "the rollback.",
        epilog=ROLLBACK_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmd.add_argument(
        "uri",
        help="the output or promotion prefix (file:// or s3://, ending in "
        "/), or the .kquant/beside-<precision>/ folder of an output beside "
        "the originals",
    )
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--to", metavar="SET", help="the set id to restore (default: the previous)")
    which.add_argument(
        "--again",
        action="store_true",
        help="go one set further back although the last operation here was a rollback (by "
        "default a rerun finishes that rollback and goes no further)",
    )
    which.add_argument(
        "--from",
        dest="from_set",
        metavar="SET",
        help="roll back from SET, the current set: one set back; a rerun after SET was left "
        "does nothing more (retry-safe --again)",
    )
    add_endpoint_argument(cmd)
    cmd.set_defaults(func=cmd_rollback)


def split_home(uri: str) -> tuple[str, str]:
    """(prefix, home) of the URI a user names: an output or promotion prefix (home ''), its
    ``manifest.json``, or the folder of an output beside the originals
    (``models/.kquant/beside-fp16/``: prefix ``models/``, home ``.kquant/beside-fp16/``,
    whose fixed names sit in ``models/``)."""
    from kquant_job.sets.layout import KQUANT_DIR, MANIFEST, SETS

    uri = uri.removesuffix(MANIFEST).rstrip("/") + "/"
    head, marker, rest = uri.rpartition(f"/{KQUANT_DIR}")
    home = f"{KQUANT_DIR}{rest}"
    if marker and rest.count("/") == 1 and rest != "/" and home != SETS:
        return head + "/", home
    return uri, ""


def cmd_rollback(args: argparse.Namespace) -> int:
    """Roll back and say what changed; returns the exit code of the error class (0 on
    success)."""
    from kquant_job.sets.rollback import rollback
    from kquant_job.storage import open_storage

    prefix, home = split_home(args.uri)
    config = StorageConfig(endpoint=args.endpoint_url) if args.endpoint_url else None
    try:
        done = rollback(open_storage(prefix, config), prefix, args.to, home,
                        again=args.again, from_set=args.from_set)  # fmt: skip
    except KquantError as exc:
        LOG.error("%s: %s", exc.reason.value, exc, extra={"fields": {"reason": exc.reason.value}})
        return int(REASON_EXIT_CODE[exc.reason])
    when = f" at {done.at}" if done.at else ""
    if done.earlier and done.pending:
        print(f"{prefix}: finished an interrupted rollback: set {done.current} is current "
              f"again (rolled back from {done.previous}{when}); "
              f"{len(done.mirrors.copied)} fixed name(s) copied, "
              f"{len(done.mirrors.removed)} removed")  # fmt: skip
    elif done.earlier:
        print(f"{prefix}: rollback already done: current set is {done.current} (rolled back "
              f"from {done.previous}{when}); fixed names in step; pass --again to go one set "
              f"further (or --from {done.current}, which a rerun does not repeat)")  # fmt: skip
    elif done.previous == done.current:
        print(f"{prefix}: set {done.current} is already current; fixed names in step")
    else:
        print(f"{prefix}: set {done.current} is current again (was {done.previous}); "
              f"{len(done.mirrors.copied)} fixed name(s) copied, "
              f"{len(done.mirrors.removed)} removed")  # fmt: skip
    if done.mirrors.foreign:
        print(f"left alone, not kquant's: {', '.join(done.mirrors.foreign[:5])}")
    return 0
