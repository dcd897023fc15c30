"""X-ARES (the `xares` benchmark, arXiv 2505.16369) on wat encoders and caches.

- `encoder_class(model, layer, policy)`: an X-ARES encoder class for any wat encoder (`load_encoder`)
  and layer choice (a block, "mean" of the blocks, "concat" of them), with the encoder's true hop and
  no pooling over padding (`encoder.py`); passes `xares.audio_encoder_checker.check_audio_encoder`.
- `export_task(features, task, layer=...)`: a wat cache's pooled frames as a task's X-ARES embedding
  shards, marked encoded, so X-ARES's MLP and kNN score them without running the encoder (`export.py`).
- `wat-xares encoder|export`: both from the command line (`cli.py`).

xares itself is installed without its torchaudio dependency (`make venv`; setup.cfg extra `xares`),
and imported through `wat.data.no_torchaudio`.
"""
_LAZY = {"XaresEncoder": "encoder", "encoder_class": "encoder", "class_name": "encoder", "export_task": "export",
         "load_task": "export", "import_xares": "export", "XaresError": "export", "parse_layer": "layers"}


def __getattr__(name):
    # torch is imported by the modules that need it, when first asked for: `wat-xares --help` stays instant
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
