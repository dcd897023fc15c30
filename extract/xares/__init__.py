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
from .encoder import XaresEncoder, class_name, encoder_class
from .export import XaresError, export_task, import_xares, load_task
from .layers import parse_layer

__all__ = ["XaresEncoder", "encoder_class", "class_name", "export_task", "load_task", "import_xares", "XaresError",
           "parse_layer"]
