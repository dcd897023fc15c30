"""wat-xares: X-ARES on wat encoders (an encoder file for `python -m xares.run`) and on wat caches
(a cache exported as a task's X-ARES embeddings)."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from wat.data.clikit.args import add_features, add_model, add_out, int_range, nonempty, parse_args
from wat.data.clikit.main import run_command
from wat.data.files import atomic_write

ENCODER_FILE = '''"""X-ARES encoder: {model}, layer {layer}, policy {policy} (written by wat-xares encoder)."""
from wat.extract import xares

{name} = xares.encoder_class({model!r}, layer={layer!r}, policy={policy!r}, batch_size={batch_size})
'''


def _layer(text: str):
    from .layers import parse_layer
    try:
        return parse_layer(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wat-xares", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("encoder", help="write an X-ARES encoder file: python -m xares.run FILE TASK.py ...")
    add_model(e, "any wat encoder, as wat-extract --model takes (default base)", default="base")
    e.add_argument("--layer", type=_layer, default=-1, help="a block (negative: from the last; default -1), mean "
                   "(the mean of every block's output) or concat (every block, concatenated along features)")
    e.add_argument("--policy", choices=("pad30", "trim"), help="input policy (default: the encoder's; Whisper pad30, "
                   "others trim)")
    e.add_argument("--batch-size", type=int_range(1, 4096), default=16, help="clips encoded together")
    add_out(e, "the .py file to write (run X-ARES from its folder)", metavar="ENCODER_PY")
    r = sub.add_parser("run", help="python -m xares.run in this process (xares imported without torchaudio), "
                       "e.g. wat-xares run enc.py esc50_task.py --from-stage 2")
    r.add_argument("encoder_py", type=nonempty("encoder file"), help="encoder file (wat-xares encoder), relative to the current folder")
    r.add_argument("tasks_py", nargs="+", type=nonempty("task file"), help="X-ARES task files")
    r.add_argument("--from-stage", type=int_range(0, 2), default=0, help="0 download, 1 encode, 2 score")
    r.add_argument("--to-stage", type=int_range(0, 2), default=2)
    x = sub.add_parser("export", help="a wat cache as a task's X-ARES embeddings (no re-encoding)")
    add_features(x, "cache of the task's clips")
    x.add_argument("--task", required=True, metavar="TASK_PY", type=nonempty("task file"), help="X-ARES task file, e.g. src/tasks/esc50_task.py")
    x.add_argument("--layer", type=_layer, default=-1, help="as for `encoder` (blocks as the cache names them)")
    x.add_argument("--env-root", type=nonempty("folder"), help="X-ARES's env folder (default: the task's, ./env)")
    x.add_argument("--encoder-name", help="the encoder class name X-ARES will run with (default: what "
                   "`wat-xares encoder` names the same model, layer and policy)")
    x.add_argument("--skip-missing", action="store_true", help="leave out task clips the cache lacks")
    x.add_argument("--overwrite", action="store_true", help="replace embeddings exported before")
    return p


def _run(a, XaresError, import_xares) -> None:
    """`python -m xares.run` in this process, after the checks it lacks (it ends in a traceback on a
    missing or absolute file, and at --from-stage 2 skips a task without embeddings, scoring nothing)."""
    for f in (a.encoder_py, *a.tasks_py):
        p = Path(f)
        if not p.is_file():
            raise XaresError(f"{f}: no such file")
        if p.suffix != ".py" or p.is_absolute() or not all(s.isidentifier() for s in (*p.parent.parts, p.stem)):
            raise XaresError(f"{f}: xares.run imports it as the module its path names: give a NAME.py path below "
                             "the current folder whose parts are identifiers (or run from its folder)")
    if a.from_stage > a.to_stage:
        raise XaresError(f"--from-stage {a.from_stage} is after --to-stage {a.to_stage}: nothing to run")
    if a.from_stage <= 1 <= a.to_stage:
        from wat.data.no_torchaudio import torchaudio_problem
        why = torchaudio_problem()
        if why:   # webdataset's torch_audio decoder would skip every clip and stage 1 mark nothing encoded as done
            raise XaresError(f"X-ARES stage 1 decodes the task audio with torchaudio, which cannot be imported here "
                             f"({why}): score a wat cache instead (`wat-xares export`, then --from-stage 2)")
    # xares.run imports the encoder and task files as modules named after their paths from here;
    # one process (max_jobs 0): spawned workers would import xares again, without the placeholder
    sys.path.insert(0, str(Path.cwd()))
    run = import_xares("xares.run")
    try:
        if a.from_stage == 2:   # scoring only: the embeddings must be there already
            from .export import embeddings_dir
            name = run.attr_from_py_path(a.encoder_py, endswith="Encoder").__name__
            for task in a.tasks_py:
                config = run.attr_from_py_path(task, endswith="_config")(None)
                where = embeddings_dir(config, name)
                if not (where / config.xares_settings.encoded_ready_filename).exists():
                    raise XaresError(f"{task}: no embeddings of {name} in {where} to score: encode them first (X-ARES "
                                     f"stage 1, or `wat-xares export --task {task}` with that encoder's name)")
        with _start_method_untouched(run):
            run.main(argparse.Namespace(encoder_py=a.encoder_py, tasks_py=a.tasks_py, max_jobs=0,
                                        from_stage=a.from_stage, to_stage=a.to_stage))
    except (ValueError, RuntimeError) as e:   # xares.run's own refusals (module not found, no or several *Encoder
        # classes, "Empty dataloader" of a task marked encoded without embeddings)
        raise XaresError(f"xares.run: {e}") from None


@contextlib.contextmanager
def _start_method_untouched(run):
    """xares.run.main sets the process-wide start method to spawn without force=, which raises
    "context has already been set" where a start method is already chosen (a second run in one
    process, or the caller's own choice, pytest's included). With max_jobs 0 it starts no process,
    so its call is skipped for the run and the caller's setting is left as it was."""
    mp = run.torch.multiprocessing
    set_start_method = mp.set_start_method
    mp.set_start_method = lambda method=None, force=False: None
    try:
        yield
    finally:
        mp.set_start_method = set_start_method


def main(argv=None) -> int:
    return run_command("wat-xares", lambda: _main(argv))


def _main(argv) -> int:
    a = parse_args(parser(), argv)
    if a.command == "encoder":
        from .encoder import XaresEncoder, class_name
        from .export import XaresError
        path = Path(a.out)
        if path.suffix != ".py" or not path.stem.isidentifier():
            raise XaresError(f"--out {a.out}: X-ARES imports the file as a module: a name.py whose name is an "
                             "identifier")
        if path.is_dir() or not path.parent.is_dir():
            raise XaresError(f"--out {a.out}: " + ("a folder" if path.is_dir() else f"no folder {path.parent}"))
        # the encoder X-ARES will build, built once here: a model that does not load, a layer it lacks or
        # a policy it does not take is refused now, not when xares.run imports the file
        try:
            encoder = XaresEncoder(a.model, a.layer, a.policy, device="cpu", batch_size=a.batch_size)
        except ValueError as e:
            raise XaresError(f"--model {a.model}: {e}") from None
        name = class_name(a.model, a.layer, encoder.policy)
        atomic_write(path, ENCODER_FILE.format(model=a.model, layer=a.layer, policy=encoder.policy, name=name,
                                               batch_size=a.batch_size))
        print(f"{path}: class {name} ({encoder.encoder.n_layers} block(s) of width {encoder.encoder.dim}, output "
              f"{encoder.output_dim} per {encoder.hop_size_in_ms:g} ms); run: python -m xares.run {path} "
              "src/tasks/esc50_task.py")
        return 0
    from .export import XaresError, export_task, import_xares
    if a.command == "run":
        _run(a, XaresError, import_xares)
        return 0
    r = export_task(a.features, a.task, layer=a.layer, encoder_name=a.encoder_name, env_root=a.env_root,
                    skip_missing=a.skip_missing, overwrite=a.overwrite)
    splits = ", ".join(f"{k}: {v}" for k, v in r["splits"].items())
    print(f"{r['embeddings']}: {sum(r['splits'].values())} clips ({splits}), {r['frames_per_clip']} frames x "
          f"{r['output_dim']} per clip" + (f"; {r['skipped']} task clips not in the cache skipped" if r["skipped"] else ""))
    print(f"score with X-ARES using the encoder class {r['encoder_name']} (its name is the embeddings folder), e.g. "
          f"`wat-xares encoder --out enc.py ...` then `python -m xares.run enc.py TASK.py --from-stage 2`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
