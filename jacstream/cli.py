"""The ``jacstream`` command: argument parsing over the public API, nothing more.

Each subcommand parses its arguments and calls one library function. Nothing
here imports TensorFlow: a command that needs a model loads it through
:mod:`jacstream.engine`, so ``jacstream --help`` and ``jacstream info`` start in
a fraction of a second.

Errors a user can fix (a missing file, a bad option, a store made for another
job) print one line, ``jacstream: error: ...``, and exit with status 2;
``--debug`` shows the traceback instead. Messages name the command's flags
(``--overwrite``), not the Python arguments the library's own say
(``overwrite=True``): see :mod:`jacstream._wording`.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ._api import NONFINITE_CHOICES, STRATEGY_CHOICES
from ._version import __version__
from .errors import JacstreamError, first_line
from .planning import DTYPES

__all__ = ["build_parser", "load_model", "main", "parse_out_steps", "parse_step_range"]

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
Memory-bounded streaming Jacobians of TensorFlow sequence models.

For a model mapping inputs (batch, T_in, F_in) to outputs (batch, T_out, F_out),
jacstream computes J[i, a, f1, t2, f2] = d y[i, out_steps[a], f1] / d x[i, t2, f2]
block by block and streams it into a zarr store on disk.
"""

EPILOG = """\
example:
  jacstream compute model.keras inputs.npy jac.zarr --memory-budget 1GiB
  jacstream info jac.zarr
  jacstream plot jac.zarr --kind heatmap -o heatmap.png

Run 'jacstream COMMAND --help' for the options of a command.
"""


# --------------------------------------------------------------------------- argument types
def parse_out_steps(text: str) -> None | int | slice | list[int]:
    """Parse ``--out-steps``: ``all``, ``10``, ``-1``, ``0:100``, ``::10`` or ``100,1000,1999``.

    Examples
    --------
    >>> parse_out_steps("100,1000,1999")
    [100, 1000, 1999]
    >>> parse_out_steps("::10")
    slice(None, None, 10)
    >>> parse_out_steps("all") is None
    True
    """
    s = text.strip().replace(" ", "")
    try:
        if s.lower() in ("", "all"):
            return None
        if ":" in s:
            parts = s.split(":")
            if len(parts) > 3:
                raise ValueError
            nums = [int(p) if p else None for p in parts]
            return slice(*nums)
        if "," in s:
            return [int(p) for p in s.split(",") if p]
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a set of output steps: use 'all', one step ('10', '-1' for the "
            "last), a slice ('0:100', '::10') or a comma list ('100,1000,1999').") from None


def parse_step_range(text: str) -> slice:
    """Parse a window of steps for ``jacstream plot``: ``100:200``, ``:50``, ``1500:``.

    Examples
    --------
    >>> parse_step_range("100:200")
    slice(100, 200, None)
    """
    parts = text.strip().replace(" ", "").split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return slice(*(int(p) if p else None for p in parts))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a range of steps: use START:STOP, e.g. '100:200' (steps 100..199), "
            "':50' or '1500:'.") from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def _nonnegative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def _causal(text: str) -> str | bool:
    choices: dict[str, str | bool] = {"auto": "auto", "true": True, "yes": True,
                                      "false": False, "no": False, "trust": "trust"}
    value = choices.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected auto, true, false or trust, got {text!r}")
    return value


# --------------------------------------------------------------------------- parser
def _common(default: Any) -> argparse.ArgumentParser:
    # --quiet/--debug work before or after the command. Subcommands get their
    # own copies with default SUPPRESS, so they never overwrite a value given
    # before the command (parents share action objects: hence two parsers).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="no progress bar and no summary")
    common.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback on errors")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jacstream`` command (no TensorFlow involved)."""
    parser = argparse.ArgumentParser(
        prog="jacstream", description=DESCRIPTION, epilog=EPILOG, parents=[_common(False)],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"jacstream {__version__}")
    common = _common(argparse.SUPPRESS)
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    _add_compute(sub, common)
    _add_info(sub, common)
    _add_plot(sub, common)
    _add_demo(sub, common)
    return parser


def _add_compute(sub: Any, common: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "compute", parents=[common], formatter_class=raw,
        help="compute a model's Jacobian into a zarr store (resumes an interrupted one)",
        description="Compute d y[i, t1, f1] / d x[i, t2, f2] of a Keras model on the given "
                    "inputs,\nstreamed block by block into the zarr store STORE. Running the "
                    "same command\nagain on an interrupted store finishes it (resume).",
        epilog="examples:\n"
               "  jacstream compute model.keras inputs.npy jac.zarr\n"
               "  jacstream compute model.keras inputs.zarr jac.zarr --out-steps 100,1000,1999\n"
               "  jacstream compute model.keras inputs.npy jac.zarr --memory-budget 512MiB "
               "--causal true\n")
    p.add_argument("model", metavar="MODEL",
                   help="a Keras model file (.keras, or legacy .h5) saved with model.save()")
    p.add_argument("inputs", metavar="INPUTS",
                   help="inputs of shape (batch, steps, features): a .npy file or the path of "
                        "a zarr array (read batch by batch, so it may exceed memory)")
    p.add_argument("store", metavar="STORE", help="directory of the zarr store to write")
    p.add_argument("--out-steps", type=parse_out_steps, default=None, metavar="STEPS",
                   help="output steps to differentiate: 'all' (default), one step ('10'), a "
                        "slice ('0:100', '::10') or a list ('100,1000,1999'); negative steps "
                        "count from the end (write them after '=': --out-steps=-10:)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="bound on working memory, e.g. 1GiB or 512MB (default: 2GiB or a "
                        "quarter of available memory, whichever is less)")
    p.add_argument("--block-size", type=_positive_int, metavar="N",
                   help="output steps per block (default: chosen from the memory budget)")
    p.add_argument("--examples-per-block", type=_positive_int, metavar="N",
                   help="examples per block: slices a large batch axis (default: all that fit "
                        "the budget)")
    p.add_argument("--causal", type=_causal, default="auto", metavar="{auto,true,false,trust}",
                   help="skip the zero upper triangle of a causal model: 'auto' (default) "
                        "checks the model, 'true' promises it (checked numerically), "
                        "'trust' promises it without the check")
    p.add_argument("--strategy", choices=STRATEGY_CHOICES, default="auto",
                   help="how blocks are differentiated (default: auto)")
    p.add_argument("--device", metavar="DEVICE",
                   help="cpu, gpu, gpu:1... (default: a GPU if TensorFlow sees one)")
    p.add_argument("--dtype", choices=DTYPES,
                   default="float32", help="storage dtype (default: float32)")
    p.add_argument("--on-nonfinite", choices=NONFINITE_CHOICES, default="raise",
                   help="what to do with NaN/Inf in a block (default: raise)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace STORE if it holds another job")
    p.add_argument("--unsafe", action="store_true",
                   help="allow model files that hold Python code (Lambda layers); only for "
                        "files you trust")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the blocks on the dask cluster whose scheduler is at ADDRESS "
                        "(e.g. tcp://10.0.0.5:8786); STORE must be on a filesystem every "
                        "worker sees at the same path")
    p.set_defaults(func=_cmd_compute, parser=p)


def _add_info(sub: Any, common: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "info", parents=[common], formatter_class=raw,
        help="describe a store: shape, job options, progress, size, timing",
        description="Describe a Jacobian store: shape and layout, the job's options, "
                    "finished / total\nblocks, bytes on disk against the dense size, and how "
                    "long it took.",
        epilog="example:\n  jacstream info jac.zarr\n  jacstream info jac.zarr --json\n")
    p.add_argument("store", metavar="STORE", help="a store written by 'jacstream compute'")
    p.add_argument("--json", action="store_true",
                   help="print the store's metadata as JSON instead")
    p.set_defaults(func=_cmd_info, parser=p)


def _add_plot(sub: Any, common: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "plot", parents=[common], formatter_class=raw,
        help="plot a store: a (output step x input step) heatmap or a lag profile",
        description="Plot a Jacobian store: 'heatmap' shows |J| over (output step, input step)"
                    "\nfor one example and feature pair; 'lag' shows how influence decays with "
                    "the lag\nt1 - t2.",
        epilog="examples:\n"
               "  jacstream plot jac.zarr --kind heatmap --log -o heatmap.png\n"
               "  jacstream plot jac.zarr --out-steps 1000:1200 --in-steps 900:1200 --log\n"
               "  jacstream plot jac.zarr --max-lag 50 --log -o band.png\n"
               "  jacstream plot jac.zarr --kind lag -o lag.png\n")
    p.add_argument("store", metavar="STORE", help="a store written by 'jacstream compute'")
    p.add_argument("--kind", choices=("heatmap", "lag"), default="heatmap",
                   help="which plot (default: heatmap)")
    p.add_argument("--example", type=_nonnegative_int, default=0, metavar="I",
                   help="example to show in a heatmap (default: 0)")
    p.add_argument("--out-feature", type=_nonnegative_int, default=0, metavar="F",
                   help="output feature (default: 0)")
    p.add_argument("--in-feature", type=_nonnegative_int, default=0, metavar="F",
                   help="input feature (default: 0)")
    p.add_argument("--out-steps", type=parse_step_range, metavar="START:STOP",
                   help="heatmap: only these output steps, e.g. 1000:1200 (reads only "
                        "their chunks)")
    p.add_argument("--in-steps", type=parse_step_range, metavar="START:STOP",
                   help="heatmap: only these input steps, e.g. 900:1200")
    p.add_argument("--max-lag", type=_nonnegative_int, metavar="L",
                   help="heatmap: output step against lag t1 - t2 = 0..L, the band along the "
                        "diagonal (reads only the input steps within L of each output step); "
                        "lag: draw lags up to L")
    p.add_argument("--log", action="store_true", help="logarithmic colour scale")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="image file to write (default: heatmap.png or lag_profile.png)")
    p.set_defaults(func=_cmd_plot, parser=p)


def _add_demo(sub: Any, common: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "demo", parents=[common], formatter_class=raw,
        help="train the reference LSTM and stream its Jacobian at T=2000 (what 'make demo' "
             "runs)",
        description="Train the reference model (LSTM(32) -> TimeDistributed(Dense(1))) for a "
                    "few epochs\non random data, compute its Jacobian for a batch of long "
                    "sequences into\nOUTPUT/jacobian.zarr under a 1 GiB memory budget, and "
                    "summarise it.",
        epilog="example:\n  jacstream demo --output demo-output\n")
    p.add_argument("--output", default="demo-output", metavar="DIR",
                   help="directory for the model, inputs, store and plots (default: "
                        "demo-output)")
    p.add_argument("--steps", type=_positive_int, default=2000, metavar="T",
                   help="sequence length of the inputs (default: 2000)")
    p.add_argument("--batch", type=_positive_int, default=10, metavar="B",
                   help="number of input sequences (default: 10)")
    p.add_argument("--epochs", type=_nonnegative_int, default=3, metavar="N",
                   help="training epochs (default: 3)")
    p.add_argument("--memory-budget", default="1GiB", metavar="SIZE",
                   help="memory budget of the computation (default: 1GiB)")
    p.set_defaults(func=_cmd_demo, parser=p)


# --------------------------------------------------------------------------- commands
def _cmd_compute(args: argparse.Namespace) -> int:
    import jacstream
    from jacstream.run.inputs import as_inputs

    inputs = as_inputs(args.inputs)  # a bad path fails before the slow model load
    from jacstream.engine.modelfile import check_model_file
    from jacstream.run.progress import say, shown

    check_model_file(args.model)  # a wrong path too: refused before TensorFlow is imported
    if shown(not args.quiet):
        say(f"loading the model {args.model!r} (and TensorFlow) ...")
    model = load_model(args.model, unsafe=args.unsafe)
    client = None
    if args.scheduler:
        from jacstream.run.dask import connect

        client = connect(args.scheduler)  # a JacstreamError when unreachable
    try:
        result = jacstream.jacobian(
            model, inputs, args.store, out_steps=args.out_steps, block_size=args.block_size,
            memory_budget=args.memory_budget, examples_per_block=args.examples_per_block,
            causal=args.causal, strategy=args.strategy, device=args.device, dtype=args.dtype,
            overwrite=args.overwrite, progress=not args.quiet,
            on_nonfinite=args.on_nonfinite, client=client)
    finally:
        if client is not None:
            client.close()
    if not args.quiet:
        print(result.summary())
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    import jacstream
    from jacstream.planning import format_bytes

    with warnings.catch_warnings():  # the summary itself says the store is incomplete
        warnings.simplefilter("ignore", jacstream.errors.IncompleteStoreWarning)
        result = jacstream.open(args.store)
    if args.json:
        import json

        print(json.dumps(result.attrs, indent=2, default=str))
        return EXIT_OK
    plan, meta = result.plan, result.attrs
    budget = format_bytes(plan.memory_budget) if plan.memory_budget else "none"
    print(result.summary())
    print(f"  blocking     {plan.block_size} output steps x {plan.examples_per_block} examples "
          f"per block; zarr chunks {plan.chunks}")
    print(f"  budget       {budget} (estimated peak {format_bytes(plan.estimated_peak)})")
    print(f"  device       {meta.get('device', '-')}; created {meta.get('created', '-')}")
    return EXIT_OK


def _cmd_plot(args: argparse.Namespace) -> int:
    import jacstream

    os.environ.setdefault("MPLBACKEND", "Agg")  # write files; never open a window
    from jacstream.analysis import plot
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jacstream.errors.IncompleteStoreWarning)
        result = jacstream.open(args.store)
    out = args.output or ("heatmap.png" if args.kind == "heatmap" else "lag_profile.png")
    if args.kind == "heatmap":
        plot.heatmap(result, example=args.example, out_feature=args.out_feature,
                     in_feature=args.in_feature, log=args.log, path=out,
                     out_steps=args.out_steps, in_steps=args.in_steps, max_lag=args.max_lag)
    else:
        if args.out_steps is not None or args.in_steps is not None:
            raise jacstream.errors.InputError(
                "--out-steps and --in-steps choose a window of a heatmap; the lag profile "
                "averages over every step. Use --kind heatmap (or --max-lag with --kind lag).")
        plot.lag_profile(result, path=out, max_lag=args.max_lag)
    if not args.quiet:
        print(f"wrote {out}")
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    run_demo(args.output, steps=args.steps, batch=args.batch, epochs=args.epochs,
             memory_budget=args.memory_budget, progress=not args.quiet,
             echo=(lambda s: None) if args.quiet else print)
    return EXIT_OK


# --------------------------------------------------------------------------- models
def load_model(path: str | os.PathLike[str], *, unsafe: bool = False) -> Any:
    """Load a Keras model file, in Keras safe mode unless ``unsafe`` (see
    :func:`jacstream.engine.io.load_model_file`)."""
    from .engine.io import load_model_file

    return load_model_file(path, unsafe=unsafe)


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``jacstream`` command with ``argv`` (default: ``sys.argv[1:]``); return the status.

    Examples
    --------
    >>> main(["--version"])  # doctest: +SKIP
    jacstream 0.1.0
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse has printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from ._wording import cli_wording
    from .run.progress import worded

    def reword(text: str) -> str:
        return cli_wording(text, args.parser)

    try:
        with worded(reword):
            return int(args.func(args))
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        if not getattr(e, "jacstream_said", False):   # the run said how it stands already
            print("jacstream: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (JacstreamError, OSError) as e:
        if args.debug:
            raise
        print(f"jacstream: error: {reword(str(e))}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if args.debug:
            raise
        print(f"jacstream: error: {type(e).__name__}: {reword(first_line(e))} (run again "
              "with --debug for the traceback)", file=sys.stderr)
        return EXIT_UNEXPECTED
