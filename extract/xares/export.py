"""A wat cache as X-ARES embeddings: X-ARES's MLP and kNN on features wat already extracted.

X-ARES (xares 0.1.3) keeps, per task, `ENV/TASK/embeddings/ENCODER/` webdataset shards named by the
task's `encoded_tar_name_of_split` (e.g. `wds-encoded-fold-1-000000.tar`), one sample per clip:
`npy` = the encoder's frames [T, D] float32, `json` = the clip's label record from the task's audio
tar, and a `.encoded_tar_ready` file that makes `XaresTask.make_encoded_tar` skip encoding. The
export writes exactly that from a cache: each clip of the task's audio tars (matched by file stem,
X-ARES's sample key) gets the cache's pooled frames of the chosen layer(s) and its own label record,
in the split whose audio tar holds it. X-ARES's scoring then runs unchanged (`xares.run ...
--from-stage 2`, or `XaresTask.run_mlp()` / `run_knn()`).

Differences from X-ARES encoding the audio itself, on purpose: the frames are the cache's pooled
windows (`n_frames` per clip, e.g. 25), whose mean is the cache's `mean` (X-ARES's probes average the
frames, so a clip task scores the same mean); one sample per clip where X-ARES would cut clips
longer than a task's `crop_length` into several; clip tasks only (frame tasks need native frames:
use `encoder_class`).
"""
from __future__ import annotations

import importlib
import io
import re
import tarfile
from pathlib import Path

import numpy as np

from wat.data.errors import WatError

from .layers import LayerChoice, output_dim, parse_layer, reduce_layers, resolve_layer

_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")   # webdataset's key / extension split of a tar member


class XaresError(WatError):
    """The export cannot be done as asked (task, cache, layer); the message says why."""


class _SameRate:
    """What xares.audiowebdataset gets for `torchaudio` where torchaudio cannot be imported: its one
    use, `torchaudio.functional.resample(audio, sr, target)` (on every clip X-ARES encodes), is the
    identity when sr == target, exactly as torchaudio's own resample is; any other use goes to the
    `wat.data.no_torchaudio` placeholder, which raises saying why."""

    def __init__(self, placeholder):
        self.placeholder, self.functional = placeholder, self

    def resample(self, waveform, orig_freq, new_freq, *args, **kwargs):
        if orig_freq == new_freq:
            return waveform
        return self.placeholder.functional.resample   # raises TorchaudioUnavailable, naming it

    def __getattr__(self, attr):
        return getattr(self.placeholder, attr)


def import_xares(module: str = "xares.task"):
    """Import an xares module where torchaudio cannot be imported (`wat.data.no_torchaudio`).
    transformers (which xares imports) asks `importlib.util.find_spec("torchaudio")` while it is
    imported, which a placeholder module cannot answer truthfully: it is imported first. Audio at
    the encoder's rate then encodes without torchaudio (`_SameRate`); other rates need a real one
    (or the export, which works from wat's own decoding)."""
    from wat.data.no_torchaudio import PLACEHOLDER_ATTR, import_without_torchaudio

    try:
        importlib.import_module("transformers")
        awd = import_without_torchaudio("xares.audiowebdataset")
        if not isinstance(awd.torchaudio, _SameRate) and getattr(awd.torchaudio, PLACEHOLDER_ATTR, False):
            awd.torchaudio = _SameRate(awd.torchaudio)
        return import_without_torchaudio(module)
    except ImportError as e:
        raise XaresError(f"{module} cannot be imported ({e}); install it as `make venv` does: "
                         "pip install '.[xares]' && pip install --no-deps xares==0.1.3") from None


def load_task(task):
    """A `TaskConfig`, or the path of an X-ARES task file (its one `*_config(encoder)` function is
    called with no encoder) -> TaskConfig."""
    xt = import_xares("xares.task")
    if isinstance(task, xt.TaskConfig):
        return task
    path = Path(task)
    if not path.is_file():
        raise XaresError(f"X-ARES task file {path} not found (e.g. xares' src/tasks/esc50_task.py)")
    spec = importlib.util.spec_from_file_location(f"_wat_xares_task_{path.stem}", path)
    if spec is None:   # importlib makes modules of .py files only
        raise XaresError(f"{path}: an X-ARES task file is a Python file (.py), e.g. xares' src/tasks/esc50_task.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:   # a task file is user code: its failure is one line, not a traceback
        raise XaresError(f"{path}: cannot be imported: {type(e).__name__}: {e}") from None
    makers = [v for k, v in vars(module).items() if k.endswith("_config") and callable(v)]
    if len(makers) != 1:
        raise XaresError(f"{path}: expected one function whose name ends in '_config', found {len(makers)}")
    try:
        config = makers[0](None)
    except Exception as e:   # user code too
        raise XaresError(f"{path}: {makers[0].__name__}(None) failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, xt.TaskConfig):
        raise XaresError(f"{path}: {makers[0].__name__}(None) returned a {type(config).__name__}, not a TaskConfig")
    return config


def audio_records(urls) -> list[tuple[str, bytes]]:
    """(key, json bytes) of every sample of X-ARES audio tars, in order; the audio is not decoded."""
    out = []
    for url in urls:
        records: dict[str, bytes | None] = {}
        with tarfile.open(url) as tar:
            for member in tar:
                m = _KEY.match(member.name) if member.isfile() else None
                if m is None:
                    continue
                key, ext = m.groups()
                records.setdefault(key, None)
                if ext == "json":
                    records[key] = tar.extractfile(member).read()
        for key, record in records.items():
            if record is None:
                raise XaresError(f"{url}: sample {key!r} has no .json label record")
            out.append((key, record))
    return out


def sample_key(clip_id: str) -> str:
    """X-ARES's key of a clip file (`write_audio_tar`): its stem with dots made underscores."""
    return Path(clip_id).stem.replace(".", "_")


def embeddings_dir(config, encoder_name: str, env_root=None) -> Path:
    """Where X-ARES keeps (and stage 2 reads) a task's embeddings by the encoder class `encoder_name`
    (`XaresTask.encoded_tar_dir`); its ready mark is `config.xares_settings.encoded_ready_filename`."""
    return Path(env_root if env_root is not None else config.env_root) / config.name / config.embedding_dir_name / encoder_name


def export_task(features, task, *, layer: LayerChoice = -1, encoder_name: str | None = None,
                env_root=None, skip_missing: bool = False, overwrite: bool = False) -> dict:
    """Write the cache `features` as the embeddings of `task` (TaskConfig or task file) for the
    encoder class named `encoder_name` (default: `encoder.class_name` of the cache's model, `layer`
    and policy: the name `encoder_class` gives the same choice). Returns what was written."""
    import torch

    from wat.data.cache import open_cache
    from wat.data.cache import FeatureStore

    from .encoder import class_name

    config = load_task(task)
    if config.task_type != "clip":
        raise XaresError(f"task {config.name} is a {config.task_type!r} task: the export holds pooled frames, "
                         "for clip tasks only; run the encoder itself (wat.extract.xares.encoder_class)")
    cache = open_cache(features)
    meta = cache.meta
    try:
        blocks = resolve_layer(layer, meta.n_layers, meta.layers)
    except ValueError as e:
        raise XaresError(f"{features}: {e}") from None
    positions = [meta.layers.index(b) for b in blocks]
    name = encoder_name or class_name(meta.model, parse_layer(layer), meta.policy)
    if not (name.isidentifier() and name.endswith("Encoder")):   # the folder name: never a path ('../x')
        raise XaresError(f"encoder name {name!r}: X-ARES names the embeddings folder after the encoder class, "
                         "an identifier ending in 'Encoder'")
    env_dir = Path(env_root if env_root is not None else config.env_root) / config.name
    out_dir = embeddings_dir(config, name, env_root)
    ready = out_dir / config.xares_settings.encoded_ready_filename
    if ready.exists() and not overwrite:
        raise XaresError(f"{out_dir} already holds X-ARES embeddings ({ready.name}); pass overwrite to replace them")

    rows_of: dict[str, int] = {}
    for i, clip_id in enumerate(cache.ids):
        key = sample_key(clip_id)
        if key in rows_of:
            raise XaresError(f"{features}: clips {cache.ids[rows_of[key]]!r} and {clip_id!r} have the same X-ARES "
                             f"key {key!r} (the file stem)")
        rows_of[key] = i
    plan, missing = {}, []
    for split, pattern in config.audio_tar_name_of_split.items():
        if split is None:
            continue
        urls = sorted(env_dir.glob(pattern))
        if not urls:
            raise XaresError(f"no audio tars {env_dir / pattern} for split {split!r} of task {config.name}: the "
                             "task's audio comes first (X-ARES stage 0), its label records are read from it")
        records = audio_records(urls)
        missing += [k for k, _ in records if k not in rows_of]
        plan[split] = [(k, rows_of[k], r) for k, r in records if k in rows_of]
    if missing and not skip_missing:
        raise XaresError(f"{len(missing)} clip(s) of task {config.name} are not in {features} (e.g. "
                         f"{', '.join(missing[:3])}); extract them, or skip them (skip_missing / --skip-missing)")

    wds = importlib.import_module("webdataset")
    out_dir.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    for old in out_dir.glob("*.tar"):     # a previous export's shards (overwrite)
        old.unlink()
    store = FeatureStore(cache, "features")
    written = {}
    for split, items in plan.items():
        pattern = (out_dir / config.encoded_tar_name_of_split[split]).as_posix().replace("*", "0%05d")
        with wds.ShardWriter(pattern, encoder=False, compress=False, maxcount=config.save_encoded_per_batches,
                             verbose=False) as sink:
            for a in range(0, len(items), 256):
                chunk = items[a:a + 256]
                x = store.get(np.array([r for _, r, _ in chunk]), dtype=torch.float32)[:, positions]  # [b, L, T, D]
                x = reduce_layers(x, layer).numpy()
                for (key, _, record), frames in zip(chunk, x):
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(frames, np.float32))
                    sink.write({"npy": buf.getvalue(), "json": record, "__key__": key})
        written[str(split)] = len(items)
    ready.touch()
    return {"encoder_name": name, "embeddings": str(out_dir), "splits": written, "skipped": len(missing),
            "output_dim": output_dim(layer, len(blocks), meta.dim), "frames_per_clip": meta.n_frames,
            "blocks": list(blocks)}
