"""Command-line options shared by the wat-* commands: one definition each, so every command spells,
defaults, validates and documents them the same way.

    add_device(p)                      --device auto|cpu|cuda|cuda:N (default auto)
    args = parse_args(p, argv)         args.device resolved to a torch device (auto -> cuda|cpu)
    (every parse_args: -v/--verbose, -q/--quiet, --progress auto|bar|log|none)
    add_workers(group, "--jobs", ...)  --workers N (1..MAX_WORKERS), old spellings as hidden aliases
    type=int_range(0, 256)             argparse types that refuse out-of-range integers and
    type=float_range(0, 30, lo_open=True)   NaN/inf/out-of-range floats with one error line
    type=layer_range                   wat-extract --layers START:STOP (a slice of encoder blocks)
    type=layer_list                    wat-probe --layers all | 0,4,8:12 (blocks and such slices)
    add_encoding(p)                    --encoding NAME of manifests/transcripts (default strict UTF-8)
    add_model(p, help, default=, repeat=)      --model MODEL (what a command loads)
    add_out(p, help, metavar=)                 --out PATH (where it writes; always required)
    add_features(p, help, metavar=, required=, repeat=)   --features FEATS_H5 (a cache it reads)
    type=nonempty("dataset folder")     any other file, folder or address option: empty/blank refused
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys

from .progress import LOG_INTERVAL, MODES
from .progress import configure as configure_progress

# --model help of every CLI that loads Whisper (what wat.extract.load_whisper accepts); kept here,
# not in load.py, so that --help does not import torch
MODEL_HELP = ("Whisper name (tiny.en, base, large-v2, large-v3, ...; 'large' is large-v3), a .pt file, "
              "a CTranslate2 or Hugging Face model folder, or a Hugging Face id (openai/whisper-large-v3)")
# --model help of the commands that take any encoder (what wat.extract.encoders.load_encoder accepts)
ENCODER_HELP = ("encoder: a Whisper model (name such as tiny.en, base, large-v2; a .pt file; a CTranslate2 or "
                "Hugging Face Whisper folder or id), a Hugging Face wav2vec2 / HuBERT / WavLM / data2vec-audio "
                "folder or id (facebook/hubert-large-ls960-ft), or crepe-full / crepe-tiny")
DEVICE_HELP = "auto (default: cuda when available, else cpu), cpu, cuda or cuda:N"


def nonempty(what: str):
    """argparse type factory: text refused when empty or blank, naming `what` (`--out ''` would be
    the current folder, `--features ''` a puzzling 'no such file'); the text is kept as given."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"an empty {what}")
        return text

    parse.__name__ = what
    return parse


# --model, --out and --features: one definition each (spelling, metavar, the refusal of an empty
# value); each command passes the help that says what the option is there.

def add_model(p, help: str = ENCODER_HELP, *, default: str | None = None, repeat: bool = False) -> None:
    """--model MODEL: what the command loads (`help`: ENCODER_HELP for any encoder family, MODEL_HELP
    where only Whisper will do, plus what is particular to the command). Required unless there is a
    `default` (say it in `help`); `repeat`: given once per model, a list."""
    if repeat and default is not None:
        raise ValueError("a repeated --model has no default (argparse would append to it)")
    p.add_argument("--model", required=default is None, default=default, metavar="MODEL",
                   action="append" if repeat else "store", type=nonempty("model"), help=help)


def add_out(p, help: str, *, metavar: str = "OUT") -> None:
    """--out: where the command writes (a file or folder, as `help` says); always required, so a
    command never picks a place to write on its own."""
    p.add_argument("--out", required=True, metavar=metavar, type=nonempty("path"), help=help)


def add_features(p, help: str, *, metavar: str = "FEATS_H5", required: bool = True, repeat: bool = False) -> None:
    """--features: a wat feature cache the command reads (its index file, e.g. feats.h5); `repeat`:
    given once per cache, a list."""
    p.add_argument("--features", required=required, metavar=metavar, action="append" if repeat else "store",
                   type=nonempty("cache path"), help=help)

def int_range(lo: int, hi: int | None = None):
    """argparse type factory: an integer in [lo, hi] (no upper bound when hi is None)."""
    want = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


positive_int = int_range(1)  # argparse type: an integer >= 1
MAX_CLASSES = 100_000  # bound of --top-k-like counts of classes: far above any vocabulary (AudioSet: 527)
seed_int = int_range(0, 2**32 - 1)  # argparse type: a random seed (numpy accepts 0..2**32-1)


def float_range(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type factory: a finite float in the interval from lo to hi (open ends excluded);
    NaN and inf are refused, so a bad value never reaches a computation."""
    want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or \
                not (value < hi if hi_open else value <= hi):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text}")  # NaN fails both tests
        return value

    parse.__name__ = "number"
    return parse


def layer_range(text: str) -> tuple[int | None, int | None]:
    """`START:STOP` (a slice of encoder blocks; either side may be left out) -> (start, stop).
    Checked here for form and order; against the blocks there are once a model or cache is open."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP (e.g. 8:32), got {text!r}") from None
    if (start is not None and start < 0) or (stop is not None and stop < 1):
        raise argparse.ArgumentTypeError(f"{text!r}: blocks are numbered from 0, STOP is exclusive")
    if start is not None and stop is not None and start >= stop:
        raise argparse.ArgumentTypeError(f"{text!r}: START must be below STOP")
    return start, stop


def comma_list(text: str, item=str, *, what: str = "value") -> tuple:
    """THE comma-separated list of the commands: items stripped, each turned into a value by `item`
    (int, float, a parser of one item); an empty list or an empty item ('', '1,,2', '1,') is refused,
    as is an item `item` refuses (ValueError / ArgumentTypeError), naming it. Negative numbers work as
    values (`--snr -10,0`: `parse_args` keeps such a value with its option)."""
    items = [s.strip() for s in text.split(",")]
    if not any(items) or not all(items):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty {what} in the comma-separated list")
    out = []
    for s in items:
        try:
            out.append(item(s))
        except (ValueError, argparse.ArgumentTypeError) as e:
            why = f" ({e})" if isinstance(e, argparse.ArgumentTypeError) else ""
            raise argparse.ArgumentTypeError(f"{s!r} is not a {what}{why}") from None
    return tuple(out)


def comma_list_of(item=str, *, what: str = "value"):
    """argparse type factory: `comma_list` of `item`s."""
    def parse(text: str) -> tuple:
        return comma_list(text, item, what=what)
    return parse


def layer_list(text: str) -> tuple[slice, ...] | None:
    """'all' -> None; else comma-separated encoder blocks (`5`) and `layer_range` slices of them (`8:32`,
    `8:`: the same blocks wat-extract --layers keeps) -> one slice per item, in order. An empty item
    ('', '1,,2') is refused: it used to mean "all" or nothing, silently. Blocks named twice and blocks
    the cache lacks are refused where the cache is known (`wat.eval.probe.select_layers`)."""
    if text.strip().lower() == "all":
        return None
    try:
        return comma_list(text, _block_item, what="layer")
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; expected 'all' (every layer) or comma-separated encoder blocks "
                                         f"and START:STOP ranges, e.g. 0,8:16") from None


def _block_item(item: str) -> slice:
    """One item of `layer_list`: a block `5` or a `layer_range` `8:32` -> a slice of blocks."""
    if ":" in item:
        return slice(*layer_range(item))
    block = int(item)
    if block < 0:
        raise argparse.ArgumentTypeError("blocks are numbered from 0")
    return slice(block, block + 1)


def layers_text(layers) -> str:
    """`layer_list`'s text back from its value (blocks as ints or slices): 'all', '0,8:16,20:'."""
    if layers is None:
        return "all"
    def one(s) -> str:
        if not isinstance(s, slice):
            return str(s)
        if s.start is not None and s.stop == s.start + 1:
            return str(s.start)
        return f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
    return ",".join(map(one, layers))


def encoding_name(text: str) -> str:
    """argparse type for --encoding: a text encoding Python knows (utf-8, latin-1, cp1252, utf-16...)."""
    import codecs

    try:
        return codecs.lookup(text).name
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r} (e.g. utf-8, latin-1, cp1252, utf-16)") from None


def add_encoding(p, what: str = "manifests") -> None:
    """--encoding of text inputs (read as strict UTF-8 without it: invalid bytes are an error naming the line)."""
    p.add_argument("--encoding", type=encoding_name, default=None, metavar="NAME",
                   help=f"text encoding of the {what} (default: UTF-8, a byte-order mark allowed; a file "
                        "that is not valid UTF-8 is refused, naming the line)")


def parse_device(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N (case-insensitive)."""
    spec = text.strip().lower()
    if spec in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", spec):
        return spec
    raise argparse.ArgumentTypeError(f"invalid device {text!r}: expected {DEVICE_HELP}")


def add_device(p, what: str = "") -> None:
    p.add_argument("--device", type=parse_device, default="auto",
                   help=(f"{what}: " if what else "") + DEVICE_HELP)


def device_problem(spec: str) -> tuple[str, str | None]:
    """(torch device string, why it cannot be used or None): auto becomes cuda or cpu."""
    import torch

    if spec == "auto":
        return ("cuda" if torch.cuda.is_available() else "cpu"), None
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            return spec, f"--device {spec}: CUDA is not available here (use cpu or auto)"
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            return spec, f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return spec, None


def resolve_device(parser: argparse.ArgumentParser, spec: str) -> str:
    """The torch device for a parsed --device; one `PROG: error:` line and exit 2 when it is not there."""
    device, problem = device_problem(spec)
    if problem:
        parser.error(problem)
    return device


def add_reporting(p) -> None:
    """-v/--verbose, -q/--quiet (Python logging of the `wat` loggers) and --progress, on every command."""
    g = p.add_argument_group("reporting")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log messages (-v: info, e.g. where a model came from; -vv: debug)")
    g.add_argument("-q", "--quiet", action="store_true", help="errors only: no warnings, no progress")
    g.add_argument("--progress", choices=MODES, default="auto",
                   help="auto (default): a bar on a terminal, else one line every "
                        f"{LOG_INTERVAL:g} s with rate and ETA (batch logs); bar, log or none")


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (test runners and tools swap it), not the one at creation."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def apply_reporting(args: argparse.Namespace) -> None:
    """Configure logging and the progress display from `add_reporting`'s options."""
    level = logging.ERROR if args.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    log = logging.getLogger("wat")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):  # one, however many main() calls
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    configure_progress("none" if args.quiet else args.progress)


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`parser.parse_args(argv)` with the reporting options (`add_reporting`, added here when the
    parser lacks them) applied, and `--device` (when the parser has one) resolved to the torch device."""
    if not any(a.dest == "quiet" for a in parser._actions):
        add_reporting(parser)
    args = parser.parse_args(_negative_values(parser, sys.argv[1:] if argv is None else list(argv)))
    apply_reporting(args)
    if getattr(args, "device", None) is not None:
        args.device = resolve_device(parser, args.device)
    return args


# a negative number, or a comma list or START:STOP range starting with one: "-10", "-5.5", "-10,0,20",
# "-1e3", "-1:2" (so that its type says what is wrong with it, not argparse "expected one argument")
_NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?([,:].*)?")  # also START:STOP ranges: "-1:2"


def _negative_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--opt -10,0` -> `--opt=-10,0` for a long option that takes one value: argparse takes "-10,0"
    for an option (only a lone negative number counts as a value), so a list starting with a negative
    number would be refused."""
    takes_value = {s for a in parser._actions if a.nargs is None for s in a.option_strings if s.startswith("--")}
    out = []
    for arg in argv:
        if out and _NEGATIVE.fullmatch(arg) and out[-1] in takes_value:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


# More worker processes than a few per CPU only compete for the CPUs; a value far beyond that is a
# typo (10**12 would try to start that many processes), refused at parse time.
MAX_WORKERS = max(64, 4 * (os.cpu_count() or 1))


def add_workers(p, *old_spellings: str, help: str, default=None) -> None:
    """--workers N (1..MAX_WORKERS): processes that do a command's work; `old_spellings` keep working, unlisted."""
    workers = int_range(1, MAX_WORKERS)
    p.add_argument("--workers", type=workers, default=default, metavar="N", help=help)
    for old in old_spellings:
        p.add_argument(old, dest="workers", type=workers, help=argparse.SUPPRESS)
