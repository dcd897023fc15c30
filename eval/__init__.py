"""wat.eval: the metrics module, layer-wise linear probing (`wat-probe`), head evaluation (`wat-eval`)
and their reports. Never imports `wat.extract`: it only needs a feature cache."""
from .metrics import Scores, accuracy, d_prime, multilabel_scores, singlelabel_scores

# (the functions probe.probe and evaluate.evaluate share their modules' names: import them from there)
_LAZY = {"ProbeOptions": "probe", "ProbeError": "probe", "ProbeReport": "probe",
         "EvalOptions": "evaluate", "EvalError": "evaluate"}


def __getattr__(name):
    # probing and evaluation pull in dask/torch; load them only when asked for
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Scores", "accuracy", "d_prime", "multilabel_scores", "singlelabel_scores", *_LAZY]
