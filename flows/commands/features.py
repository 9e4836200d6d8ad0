"""`tlflow features info|verify|gc`: inspect, check or prune the feature stores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tlflow.flows.commands.base import Command, add_json
from tlflow.tasks.lib.core import interrupts


def _store(args: argparse.Namespace) -> Path:
    """The store named on the command line, else the current one (the pointer's)."""
    from tlflow.tasks.lib.core.handoff.extract import current_store
    from tlflow.tasks.lib.core.params import load_params

    return Path(args.store) if args.store else current_store(load_params().base.paths.features)


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="?", help="an .h5 file (default: the current store)")
    add_json(p)


def info(args: argparse.Namespace) -> int:
    """A store's facts: a table, or JSON."""
    from tlflow.tasks.lib.features.store import info as store_info

    if not args.store:
        from tlflow.flows.stages import warn_if_stale

        warn_if_stale(("ingest", "extract"), "features info")
    facts = store_info(_store(args))
    if args.json:
        print(json.dumps(facts, indent=2, sort_keys=True))
        return 0
    print(f"store:     {facts['store']} ({facts['bytes'] / 2**20:.1f} MiB)")
    print(f"rows:      {facts['rows']}")
    for name, dim in facts["layers"].items():
        print(f"layer:     {name} ({dim})")
    print(f"extractor: {json.dumps(facts['extractor'], sort_keys=True)}")
    print(f"versions:  {json.dumps(facts['versions'], sort_keys=True)}")
    return 0


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", nargs="?", help="an .h5 file (default: the current store)")


def verify(args: argparse.Namespace) -> int:
    """Read every chunk; a bad checksum is a TlflowError naming the store."""
    from tlflow.tasks.lib.features.store import FeatureStore

    store = _store(args)
    interrupts.doing("features verify")
    with FeatureStore(store) as fs:
        fs.check_whole()
    print(f"{store}: every chunk passes its checksum", file=sys.stderr)
    return 0


def _gc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true", help="only count what would go")


def gc(args: argparse.Namespace) -> int:
    """One line per store: rows kept, rows removed (or that would be)."""
    from tlflow.flows.stages import prune_features
    from tlflow.tasks.lib.core.params import load_params

    verb = "would remove" if args.dry_run else "removed"
    for store, kept, removed in prune_features(load_params(), args.dry_run):
        print(f"{store}: kept {kept} rows, {verb} {removed}")
    return 0


ACTIONS = (
    Command("info", "a store's extractor, rows, layers and dims", info, _info_arguments),
    Command("verify", "read every chunk of a store and check its checksum", verify,
            _verify_arguments),
    Command("gc", "prune rows that the manifest no longer references", gc, _gc_arguments),
)


def arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True)
    for action in ACTIONS:
        action.register(actions)


def _unreachable(args: argparse.Namespace) -> int:  # an action is required: its func wins
    raise AssertionError("tlflow features without an action")


COMMAND = Command("features", "inspect or prune the feature stores", _unreachable, arguments)
