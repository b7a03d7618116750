"""The ``dask-cosim`` command: ``run`` a job into zarr/Parquet, ``dedup``, a ``demo``, and ``info``.

Exit codes: 0 success, 2 usage or bad input (one line on stderr, no traceback), 1 any
other failure (one line; ``--traceback`` shows the details), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ._options import check_dtype, check_k, check_threshold, cli_type, metavar
from .jobs import BadInput, JobSpec, count_groups, run_job

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "dask-cosim"


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (no usage block) and exits 2."""

    commands: dict[str, argparse.ArgumentParser] = {}  # the subcommands' parsers (top level only)

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.removeprefix(PROG).strip()
        hint = f"{PROG} {command} --help" if command else f"{PROG} --help"
        self.exit(EXIT_USAGE, f"{PROG}: error: {_one_line(message)} (see {hint})\n")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the cluster is shut down cleanly."""


#: Help of the A argument.
INPUT_HELP = (
    "zarr array path/URL, .npy file or .npz sparse matrix (scipy.sparse.save_npz), (batch, N, D) or (N, D)"
)


# --------------------------------------------------------------------------- argument parsing


def _chunks_arg(text: str):
    """``auto`` or ``b,n,m`` / ``n,m`` (ints, -1 or auto), each checked as the API checks it."""
    from ._options import check_axis_chunk

    if text.strip() == "auto":
        return "auto"
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected 2 (n,m) or 3 (b,n,m) block sizes, received {text!r}")
    out: list[Any] = []
    for axis, p in zip(("batch", "N", "M")[3 - len(parts) :], parts, strict=True):
        try:
            value = p if p == "auto" else int(p)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected 'auto' or comma-separated block sizes like 1,4096,4096 (ints, -1 or auto), "
                f"received {text!r}"
            ) from None
        try:
            out.append(check_axis_chunk(value, axis))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("chunks: ")) from None
    return tuple(out)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, received {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, received {text!r}")
    return value


def _seconds(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, received {text!r}")
    return value


def _scheduler_address(text: str) -> str:
    """A scheduler address distributed can connect to (scheme known, host and port well formed)."""
    from ._compat import check_scheduler_address

    expected = "expected an address like tcp://10.0.0.5:8786 or tls://host:8786"
    try:
        check_scheduler_address(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"{expected}, received {text!r} ({_one_line(err)})") from None
    return text


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, received {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, received {text!r}")
    return value


def _cluster_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where to run")
    g.add_argument(
        "--scheduler",
        type=_scheduler_address,
        metavar="ADDRESS",
        help="connect to this Dask scheduler (never shut down)",
    )
    g.add_argument(
        "--timeout", type=_seconds, default=10.0, metavar="S", help="seconds to wait for --scheduler (10)"
    )
    g.add_argument("--workers", type=_positive_int, metavar="N", help="embedded cluster: worker processes")
    g.add_argument(
        "--threads-per-worker", type=_positive_int, metavar="T", help="embedded cluster: threads per worker"
    )
    g.add_argument(
        "--memory-limit", default="auto", metavar="BYTES", help="embedded cluster: per-worker limit ('4GiB')"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar or dashboard link; summary only")
    g.add_argument("--traceback", action="store_true", help="show the traceback of unexpected errors")
    logs = g.add_mutually_exclusive_group()
    logs.add_argument(
        "--log-file",
        metavar="PATH",
        help="write the cluster's log here (default: a file under $TMPDIR/dask-cosim/, kept on failure)",
    )
    logs.add_argument(
        "--verbose",
        action="store_true",
        help="show the cluster's log on stderr instead of writing it to a file",
    )


#: The API's own checks of k, threshold and dtype, as argparse types.
_K = cli_type("k", int, check_k)
_THRESHOLD = cli_type("threshold", float, check_threshold)
_DTYPE = cli_type("dtype", str, lambda d: check_dtype(d).name)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(
        prog=PROG, description="Blocked cosine similarity of embedding sets with Dask: zarr in, zarr out."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,dedup,demo,info}")

    run = sub.add_parser(
        "run",
        help="compute similarity, top-k or pairs above a threshold into OUT",
        description="Compute S = cos(A, B) (or its top-k, or the pairs above a threshold) into OUT.",
        epilog=RUN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("a", metavar="A", help=INPUT_HELP)
    run.add_argument("b", metavar="B", nargs="?", help="second input (default: A itself)")
    run.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="zarr group (Parquet dir for --threshold)"
    )
    what = run.add_mutually_exclusive_group()
    what.add_argument("--topk", type=_K, metavar="K", help="k nearest columns of each row")
    what.add_argument(
        "--threshold", type=_THRESHOLD, metavar="T", help="every pair with score >= T, -1 <= T <= 1 (Parquet)"
    )
    run.add_argument("--exclude-self", action="store_true", help="drop i == j (self-similarity)")
    run.add_argument("--chunks", type=_chunks_arg, default="auto", metavar="b,n,m", help="output blocks")
    run.add_argument("--dtype", type=_DTYPE, metavar=metavar("dtype"), help="similarity output dtype")
    run.add_argument(
        "--device", type=cli_type("device"), default="auto", metavar=metavar("device"),
        help="auto: a GPU where a worker has one",
    )  # fmt: skip
    run.add_argument(
        "--zero-vector", type=cli_type("zero_vector"), metavar=metavar("zero_vector"),
        help="similarity of zero vectors",
    )  # fmt: skip
    run.add_argument(
        "--check-finite", action="store_true", help="fail on input blocks holding NaN/inf (checked when read)"
    )
    run.add_argument(
        "--codec", type=cli_type("codec"), default="auto", metavar=metavar("codec"),
        help="output compression (auto: none for similarity, blosc-lz4 for top-k)",
    )  # fmt: skip
    run.add_argument("--storage-options", type=_json_dict, default={}, metavar="JSON", help="fsspec options")
    run.add_argument(
        "--plan", action="store_true", help="print the plan (blocks, tasks, memory per task) and exit"
    )
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="finish a half-written OUT")
    again.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _cluster_options(run)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="generate data, run similarity and top-k jobs, verify against NumPy")
    demo.add_argument("--n", type=_positive_int, default=4096, help="rows per batch (4096)")
    demo.add_argument("--batch", type=_positive_int, default=2, help="batches (2)")
    demo.add_argument("--dim", type=_positive_int, default=64, help="vector length D (64)")
    demo.add_argument("--k", type=_positive_int, default=10, help="neighbours for the top-k job (10)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--keep", metavar="DIR", help="write inputs and outputs to DIR and keep them")
    _cluster_options(demo)
    demo.set_defaults(func=cmd_demo)

    dedup = sub.add_parser(
        "dedup", help="near-duplicate groups (connected components of score >= T) into a Parquet dir"
    )
    dedup.add_argument("a", metavar="A", help=INPUT_HELP)
    dedup.add_argument("-o", "--output", required=True, metavar="OUT", help="Parquet directory")
    dedup.add_argument(
        "--threshold", type=_THRESHOLD, default=0.95, metavar="T", help="link rows with score >= T (0.95)"
    )
    dedup.add_argument("--labels", metavar="L.npy", help="integer label per row: a label mask")
    dedup.add_argument(
        "--label-pairs", type=cli_type("label_pairs"), default="different", metavar=metavar("label_pairs"),
        help="with --labels: link only rows whose labels differ (default) or are the same",
    )  # fmt: skip
    dedup.add_argument("--chunks", type=_chunks_arg, default="auto", metavar="b,n,m", help="blocks of S")
    dedup.add_argument("--device", type=cli_type("device"), default="auto", metavar=metavar("device"))
    dedup.add_argument(
        "--storage-options", type=_json_dict, default={}, metavar="JSON", help="fsspec options"
    )
    again = dedup.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="finish a half-written OUT")
    again.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _cluster_options(dedup)
    dedup.set_defaults(func=cmd_dedup)

    info = sub.add_parser("info", help="versions, BLAS, GPU and the dask config in force")
    info.add_argument("--traceback", action="store_true", help=argparse.SUPPRESS)
    info.set_defaults(func=cmd_info)
    parser.commands = {"run": run, "demo": demo, "info": info}
    return parser


RUN_EXAMPLES = """\
examples:
  dask-cosim run A.zarr B.zarr -o S.zarr                     S = cos(A, B) into a zarr group
  dask-cosim run A.zarr -o knn.zarr --topk 10 --exclude-self  10 nearest neighbours of each row of A
  dask-cosim run A.npy B.npy -o pairs/ --threshold 0.9        every pair with score >= 0.9 (Parquet)
  dask-cosim run A.zarr -o S.zarr --resume                    finish a run that was interrupted
  dask-cosim run A.zarr -o S.zarr --scheduler tcp://10.0.0.5:8786   on an existing Dask cluster

exit codes: 0 done, 2 bad option or input (one line), 1 failure (one line), 130 interrupted
"""


def _spec_from_args(args: argparse.Namespace) -> JobSpec:
    return JobSpec(
        b=args.b,
        topk=args.topk,
        threshold=args.threshold,
        exclude_self=args.exclude_self,
        dtype=args.dtype,
        zero_vector=args.zero_vector,
        check_finite=args.check_finite,
        codec=args.codec,
        plan_only=args.plan,
        **_common_fields(args),
    )


def _common_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The JobSpec fields every job command takes: input, output, blocks, where to run."""
    return {
        "a": args.a,
        "output": args.output,
        "chunks": args.chunks,
        "device": args.device,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "scheduler": args.scheduler,
        "timeout": args.timeout,
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "memory_limit": _memory_limit(args.memory_limit),
        "quiet": args.quiet,
        "storage_options": args.storage_options,
        "log_file": args.log_path,
    }


def _memory_limit(text: str):
    from dask.utils import parse_bytes

    if text in ("auto", "0", "none", "None"):
        return "auto" if text == "auto" else None
    try:
        parse_bytes(text)
    except ValueError as err:
        raise BadInput(f"--memory-limit: expected bytes like '4GiB' or 'auto', received {text!r}") from err
    return text


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec_from_args(args)
    report = run_job(spec)
    if spec.plan_only:
        from .planning import plan_of

        print(repr(plan_of(report.result)), flush=True)
        return EXIT_OK
    print(report.summary(), flush=True)
    return EXIT_OK


def cmd_dedup(args: argparse.Namespace) -> int:
    spec = JobSpec(
        b=None,
        threshold=args.threshold,
        dedup=True,
        labels=args.labels,
        label_pairs=args.label_pairs,
        **_common_fields(args),
    )
    report = run_job(spec)
    print(report.summary(), flush=True)
    groups, rows = count_groups(spec.output, spec.storage_options or None)
    print(f"{groups} groups of size > 1 holding {rows} rows", flush=True)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return EXIT_OK if run_demo(args) else EXIT_FAILED


def cmd_info(args: argparse.Namespace) -> int:
    from ._demo import describe_environment

    for line in describe_environment():
        print(line)
    return EXIT_OK


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess
    raise Interrupted()


def _one_line(err: BaseException | str) -> str:
    text = str(err) or type(err).__name__
    return " ".join(text.split())


_API_FLAGS = re.compile(r"\b(resume|overwrite|exclude_self|check_finite)=True(?: \(--[\w-]+\))?")


_API_CHOICE = re.compile(r"\b(zero_vector|device|codec|dtype)='([\w-]+)'")


def _cli_words(text: str) -> str:
    """Messages of the library speak API (``overwrite=True``); the command's speak CLI (``--overwrite``).

    >>> _cli_words("pass overwrite=True (--overwrite) to replace it, or rerun with resume=True")
    'pass --overwrite to replace it, or rerun with --resume'
    >>> _cli_words("zero vector at row 3 while zero_vector='error'")
    'zero vector at row 3 while --zero-vector error'
    """
    text = _API_FLAGS.sub(lambda m: "--" + m[1].replace("_", "-"), text)
    return _API_CHOICE.sub(lambda m: f"--{m[1].replace('_', '-')} {m[2]}", text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dask-cosim`` and ``python -m dask_cosim``; returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the command's own parser, so the hint points at its --help
            parser.commands.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
        return int(exc.code or 0)
    try:
        args.log_path = _log_path(args)
    except BadInput as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    previous = None
    if hasattr(signal, "SIGTERM") and _in_main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    start = time.perf_counter()
    code = EXIT_FAILED
    try:
        code = args.func(args)
        return code
    except BadInput as err:
        code = EXIT_USAGE
        print(f"{PROG}: error: {_cli_words(_one_line(err))}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return _interrupted(args, start)
    except Exception as err:  # noqa: BLE001 - the CLI reports every failure as one line
        if _interrupt_behind(err):
            return _interrupted(args, start)
        print(
            f"{PROG}: error: {type(err).__name__}: {_cli_words(_one_line(err))}", file=sys.stderr, flush=True
        )
        if getattr(args, "traceback", False):
            traceback.print_exc()
        else:
            print(
                f"{PROG}: (rerun with --traceback for details{_log_note(args)})", file=sys.stderr, flush=True
            )
        return EXIT_FAILED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _tidy_log(args, code)


def _interrupted(args: argparse.Namespace, start: float) -> int:
    print(
        f"{PROG}: interrupted after {time.perf_counter() - start:.1f} s; the cluster was shut down, "
        f"finished blocks are kept (rerun with --resume){_log_note(args)}",
        file=sys.stderr,
        flush=True,
    )
    return EXIT_INTERRUPTED


def _interrupt_behind(err: BaseException) -> bool:
    """Whether ``err`` wraps a Ctrl-C: one that lands in an import can surface as another
    error (``RuntimeError: Error calling __set_name__ ...`` from a class being built)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _log_path(args: argparse.Namespace) -> str | None:
    """Where this command's cluster log goes: ``--log-file``, a default file, or None (``--verbose``)."""
    if getattr(args, "verbose", True) or not hasattr(args, "scheduler"):
        return None
    if args.log_file:
        path = os.path.abspath(os.path.expanduser(args.log_file))
        try:
            with open(path, "a"):
                pass
        except OSError as err:
            raise BadInput(f"--log-file: cannot write {path!r} ({err.strerror or err})") from None
        args.default_log = False
        return path
    from .cluster import default_log_file

    args.default_log = True
    try:
        return default_log_file()
    except OSError:  # no writable temporary folder: the log stays on stderr, as with --verbose
        return None


def _log_note(args: argparse.Namespace) -> str:
    path = getattr(args, "log_path", None)
    if path and os.path.exists(path) and os.path.getsize(path) > 0:
        return f"; the cluster's log: {path}"
    return ""


def _tidy_log(args: argparse.Namespace, code: int) -> None:
    """The default log is kept only after a failure or an interruption (the message names it);
    an empty one never."""
    path = getattr(args, "log_path", None)
    if not path or not os.path.exists(path):
        return
    if os.path.getsize(path) == 0 or (code in (EXIT_OK, EXIT_USAGE) and getattr(args, "default_log", False)):
        try:
            os.remove(path)
        except OSError:
            pass


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
