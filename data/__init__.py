"""wat.data: labels, audio decoding, dataset adapters, demo data, and the feature cache."""
# the PyPI distribution, for install hints (`wat` there is an unrelated project; the import name stays wat)
DIST = "whisper-audio-tagging"

from .audio import SAMPLE_RATE, AudioError, fit_length, load_audio
from .datasets import Clip, Dataset, DatasetError, load_dataset
from .demo import make_demo
from .labels import LabelError, Vocabulary, audioset_vocabulary, expand_labels, parent_labels
from .cache import (SCHEMA_VERSION, Cache, CacheError, CacheMeta, build_index, dask_view, info, open_cache, shard_path,
                    verify, write_shard)


def __getattr__(name):
    # the training reader imports torch; load it only when asked for
    if name == "FeatureStore":
        from .cache.store import FeatureStore
        return FeatureStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
