"""The `prunekit` command: the pipeline, one stage, the audit, and tools for model folders.

    prunekit run [DVC_ARGS...]      dvc repro with one loopback Prefect server for all stages
    prunekit flow                   every stage as one Prefect flow (no DVC cache)
    prunekit stage NAME [VARIANT]   one stage of dvc.yaml (what `dvc repro` runs)
    prunekit exp run PRESET...      named experiments of presets.yaml (dvc exp run), `exp show`: their table
    prunekit audit [RECORD]         judge the artifacts against a provenance record
    prunekit evaluate MODEL --text FILE   perplexity of a saved HF model folder on a text file
    prunekit unpack PACKED OUT      the packed export -> an HF model folder

Bad input ends with one line `error: ...` and exit status 2; SIGINT (Ctrl-C) or SIGTERM with
one line and status 130 or 143 (rerun to finish: DVC reruns a stage that did not end).
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path

from prunekit.config import ConfigError, load_params
from prunekit.storage.hessian_store import StoreError
from prunekit.storage.packing import PackingError
from stages import STAGES

from .server import api_server, offline_env


def setup_environment() -> None:
    """Quiet, offline defaults (Prefect state inside the project, no telemetry) and logging."""
    os.environ.update(offline_env())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    from . import server

    return server.main(["dvc", "repro", *args.dvc_args])


def _exp(args: argparse.Namespace) -> int:
    """presets.yaml's named experiments through `dvc exp run`, and their comparison table."""
    import subprocess

    from . import server
    from .experiments import committed_params, load_presets, run_commands, show_command

    if args.action == "show":
        return subprocess.run(show_command(args.dvc_args)).returncode
    presets = load_presets(args.presets, committed_params(Path.cwd()))
    if args.action == "list":
        print("\n".join(presets))
        return 0
    commands = run_commands(args.names, presets, args.set, args.name)
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in commands))
        return 0
    return server.run_commands(commands)


def _flow(args: argparse.Namespace) -> int:
    from .pipeline import pipeline, stage_module

    params = load_params(args.params)
    stage_module("check").check(params)  # every stage's check, before the flow starts
    with api_server():
        pipeline(params)
    return 0


def _stage(args: argparse.Namespace) -> int:
    """Read params.yaml, check it and the stage's inputs, then run the stage as a Prefect flow."""
    from stages.common import Paths, require

    from .pipeline import run_stage, stage_module

    params = load_params(args.params)
    stage = stage_module(args.name)
    variants = getattr(stage, "VARIANTS", None)
    if variants is None and args.variant is not None:
        raise ConfigError(f"stage {args.name} takes no variant, got {args.variant!r}")
    if variants is not None and args.variant not in variants:
        raise ConfigError(f"stage {args.name} needs one of {', '.join(variants)}, got {args.variant!r}")
    extra = () if args.variant is None else (args.variant,)
    stage.check(params)
    require(*stage.needs(Paths.of(params), *extra))
    with api_server():
        run_stage(args.name, stage.run, params, *extra)
    return 0


def _audit(args: argparse.Namespace) -> int:
    from prunekit.reporting.audit import EXIT, audit, summary
    from prunekit.reporting.provenance import read

    try:
        record = read(args.record)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {args.record}: {exc}") from None
    if args.against is not None and not args.against.is_dir():
        raise ConfigError(f"--against {args.against} is not a folder")
    verdicts = audit(record, args.root, args.against)
    for v in verdicts:
        if v.status != "identical" or args.verbose:
            print(v.line())
    overall, line = summary(verdicts)
    hw = record.get("hardware", {})
    print(f"{line}; record of {record.get('created')} on {hw.get('cpu', hw.get('processor', 'an unnamed machine'))}, "
          f"commit {(record.get('git') or {}).get('commit') or 'unknown'}")
    return EXIT[overall]


def _evaluate(args: argparse.Namespace) -> int:
    from prunekit.api import load, perplexity

    if not args.text.is_file():
        raise ConfigError(f"text file not found: {args.text}")
    model, tokenizer = load(str(args.model), device=args.device)
    result = perplexity(model, tokenizer, str(args.text), seqlen=args.seqlen, max_windows=args.max_windows)
    print(f"{args.model} on {args.text}: ppl {result['ppl']:.3f} over {result['tokens']} tokens "
          f"({result['windows']} windows of {args.seqlen})")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    from prunekit.storage.packing import unpack_to_folder

    print(unpack_to_folder(args.packed, args.out, args.dtype))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line ending like any bad input: one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prunekit", description=__doc__.splitlines()[0],
                epilog="Bad input ends with one line `error: ...` and exit status 2 (PRUNEKIT_DEBUG=1: with its "
                       "traceback).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="the DVC pipeline (dvc repro) with one loopback Prefect server")
    run.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to dvc repro (e.g. -f report)")
    run.set_defaults(fn=_run)
    for name, fn, text in (("flow", _flow, "every stage as one Prefect flow, no DVC cache"),
                           ("stage", _stage, "one stage of dvc.yaml, as a Prefect flow")):
        s = sub.add_parser(name, help=text)
        if name == "stage":
            s.add_argument("name", choices=STAGES)
            s.add_argument("variant", nargs="?", help="evaluate: dense, quantized, uniform, pruned or compressed; baseline: uniform or quantized")
        s.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameter file (default params.yaml)")
        s.set_defaults(fn=fn)
    exp = sub.add_parser("exp", help="named experiments of presets.yaml through dvc exp run; their table")
    actions = exp.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    run = actions.add_parser("run", help="one `dvc exp run` per preset, under one loopback Prefect server")
    run.add_argument("names", nargs="+", metavar="PRESET")
    run.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                     help="a further parameter change, after the preset's (e.g. -S schedule.search.seed=1)")
    run.add_argument("--name", default=None, help="the experiment's name (default: the preset's)")
    run.add_argument("--dry-run", action="store_true", help="print the dvc commands instead of running them")
    lst = actions.add_parser("list", help="the presets' names")
    for a in (run, lst):
        a.add_argument("--presets", type=Path, default=Path("presets.yaml"), help="preset file (default presets.yaml)")
    show = actions.add_parser("show", help="the comparison table: dvc exp show with the columns of docs/experiments.md")
    show.add_argument("dvc_args", nargs="*", metavar="DVC_ARG", help="passed to dvc exp show (e.g. --md, --csv)")
    exp.set_defaults(fn=_exp)
    audit = sub.add_parser("audit", help="judge a run against a provenance record (exit 0 identical, 1 within "
                                         "tolerance, 3 different, 4 unverified)")
    audit.add_argument("record", nargs="?", default=Path("reports/provenance.json"), type=Path)
    audit.add_argument("--root", default=Path.cwd(), type=Path, help="project root the record's paths are under")
    audit.add_argument("--against", type=Path, default=None,
                       help="a folder with the recorded run's files (another clone, a dvc pull) to compare numbers")
    audit.add_argument("-v", "--verbose", action="store_true", help="list identical artifacts too")
    audit.set_defaults(fn=_audit)
    ev = sub.add_parser("evaluate", help="perplexity of a saved model folder on a plain text file")
    ev.add_argument("model", type=Path, help="HF model folder (e.g. data/pruned/gemma3-270m) or .gguf file")
    ev.add_argument("--text", type=Path, required=True, help="plain text file, one sentence a line")
    ev.add_argument("--seqlen", type=int, default=256)
    ev.add_argument("--max-windows", type=int, default=None, help="default: every window")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(fn=_evaluate)
    un = sub.add_parser("unpack", help="the packed export -> an HF model folder that from_pretrained loads")
    un.add_argument("packed", type=Path)
    un.add_argument("out", type=Path)
    un.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="default: the export's (config.json)")
    un.set_defaults(fn=_unpack)
    return p


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised where the process is, like Ctrl-C's KeyboardInterrupt: the stage's flow
    run is reported crashed and the server this command started is stopped on the way out."""

    signum = signal.SIGTERM


def _stop(signum, frame):
    raise Stopped()


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:  # dvc's own options, after `prunekit exp show`
        if (args.command, getattr(args, "action", None)) != ("exp", "show"):
            p.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.dvc_args = [*args.dvc_args, *unknown]
    setup_environment()
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return args.fn(args)
    except (ConfigError, StoreError, PackingError) as exc:
        if os.environ.get("PRUNEKIT_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"error: stopped by {signal.Signals(signum).name} before the end; run the command again "
              f"(or `dvc repro`) to finish", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
