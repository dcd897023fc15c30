"""wat.eval: the metrics module, layer-wise linear probing (`wat-probe`), head evaluation (`wat-eval`)
and their reports. Never imports `wat.extract`: it only needs a feature cache. The names below load
on first use (scikit-learn, dask and torch are slow to import; `wat-probe --help` needs none)."""
from wat.data.lazy import lazy_names

# (the functions probe.probe and evaluate.evaluate share their modules' names: import them from there)
_LAZY = {**dict.fromkeys(("Scores", "accuracy", "d_prime", "multilabel_scores", "singlelabel_scores"), "metrics"),
         "ProbeOptions": "probe", "ProbeError": "probe", "ProbeReport": "probe",
         "EvalOptions": "evaluate", "EvalError": "evaluate"}
__all__ = [*_LAZY]
__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
