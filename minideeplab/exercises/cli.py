"""``minideeplab exercises new|check|list``: the argument parser and the command (registered in ``cli.py``)."""
from __future__ import annotations

import sys
import time


def add_parser(sub) -> None:
    """Add the ``exercises`` subcommand to ``minideeplab``'s subparsers."""
    p = sub.add_parser("exercises", help="write an exercise workspace, or grade one (docs/exercises.md)",
                       description="Exercises graded by the gradient checks (docs/exercises.md).")
    actions = p.add_subparsers(dest="action", required=True, metavar="{new,check,list}")
    new = actions.add_parser("new", help="write a student workspace (stubs, notebooks, README) into DIR")
    new.add_argument("directory", metavar="DIR")
    new.add_argument("--with-solutions", action="store_true", help="the instructor's version: solutions and answers")
    new.add_argument("--force", action="store_true", help="write into a non-empty DIR (overwrites the workspace files)")
    check = actions.add_parser("check", help="grade the workspace in DIR (exit code 0 only if every exercise passes)")
    check.add_argument("directory", metavar="DIR")
    check.add_argument("--only", action="append", metavar="NAME", help="grade only these exercises (NAME or a,b,c)")
    check.add_argument("--json", metavar="FILE", help="also write the full report as JSON to FILE ('-': stdout only)")
    actions.add_parser("list", help="list the exercises")
    p.set_defaults(func=cmd_exercises)


def cmd_exercises(args) -> int:
    from ..io import atomic_write
    from .catalog import EXERCISES
    from .workspace import check_workspace, format_report, json_report, new_workspace, resolve_only
    if args.action == "list":
        for e in EXERCISES:
            print(f"{e.name:<21} week {e.week}  textbook/{e.file:<14} {', '.join(e.functions)}")
        return 0
    if args.action == "new":
        summary = new_workspace(args.directory, args.with_solutions, args.force)
        print(f"wrote the {summary['version']}'s workspace {args.directory}: textbook/ ({len(EXERCISES)} exercises), "
              f"{len(summary['notebooks'])} notebooks, QUESTIONS.md, README.md")
        if not summary["notebooks"]:
            print("no notebooks: this installation has no notebook sources (docs/exercises.md)", file=sys.stderr)
        print(f"next: read {args.directory}/README.md; grade with 'minideeplab exercises check {args.directory}'")
        return 0
    resolve_only(args.only)            # an unknown name is an error before any work
    start = time.perf_counter()
    results = check_workspace(args.directory, args.only)
    seconds = time.perf_counter() - start
    if args.json == "-":
        print(json_report(results, args.directory, seconds), end="")
    else:
        print(format_report(results, args.directory, seconds))
        if args.json:
            with atomic_write(args.json, "w", encoding="utf-8") as f:
                f.write(json_report(results, args.directory, seconds))
    return 0 if all(r.passed for r in results) else 1
