"""The probe start alone (train/warmstart.py), no training: per fold of a head_recipe.py set's cache
(5-fold protocol: the head of fold f starts from the other folds' clips), the evaluation fold's score
of the start as a run fits it (on all the training clips: what the run trains, or keeps), of its
trial's start (on the training clips less the held-back fifth), of each single layer's start (the
per-layer probe through the head's LayerNorm), and of layer weights softmax(inner score / tau) or
uniform instead of one-hot on the inner cross-validation's layer (WA heads). TL-Tr (`--head tl-tr`):
the start routed with each `--gains` value of `warmstart.ROUTE_GAIN` (how far the chosen layer
outweighs the layer mean that TL-Tr's classifier also sees) beside `layer_probe`, that layer's exact
probe (the WA-Tr start one-hot on it). One JSON line per fold.

    python bench/head_starts.py scratch/sets/noisy660/feats.h5 --head wa-tr [--folds 1,2] [--taus 0.01,0.02]
    python bench/head_starts.py scratch/sets/hard320/feats.h5 --head tl-tr --gains 5,20,100
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from wat.data.cache import FeatureStore, open_cache
from wat.data.heads import build_head, head_class
from wat.train import warmstart as W
from wat.train.evaluation import predict, score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("features")
    p.add_argument("--head", default="wa-tr", choices=("wa-tr", "wa-mlp", "tl-tr"))
    p.add_argument("--folds", default="1,2,3,4,5")
    p.add_argument("--taus", default="0.01,0.02,0.05", help="softmax temperatures of the soft layer weights")
    p.add_argument("--gains", default=f"5,{W.ROUTE_GAIN:g},100", help="tl-tr: ROUTE_GAIN values of the routed start")
    a = p.parse_args()
    torch.set_num_threads(1)
    cache = open_cache(a.features)
    store = FeatureStore(cache, head_class(a.head).field)
    y = cache.label_matrix().astype(bool)
    ml = cache.meta.multilabel
    L, D, K = cache.meta.n_layers, cache.meta.dim, y.shape[1]

    def ev(head, te):
        return round(float(score(y[te], predict(head, store, te, ml), ml)["score"]), 4)

    def start_with(weights, tr, kind=a.head):
        """The start with these layer weights, its classifier fitted on the clips `tr`."""
        torch.manual_seed(0)
        h = build_head(kind, L, D, K)
        W.probe_start(h, store, tr, y[tr], ml, W.groups_of(tr, cache.folds, y, 0), layer_weights=weights)
        return h

    for f in (int(v) for v in a.folds.split(",")):
        tr, te = np.flatnonzero(cache.folds != f), np.flatnonzero(cache.folds == f)
        torch.manual_seed(0)
        st = W.Start(build_head(a.head, L, D, K), store, tr, cache.folds, y, ml, seed=0)
        trial_head, trial_info = st.trial_start(store)
        inner = np.array(st.info["inner_scores"])
        rec = {"fold": f, "layer": st.info["layer"], "inner_scores": [round(v, 4) for v in inner],
               "start": ev(st.start, te), "trial_layer": trial_info["layer"], "trial_start": ev(trial_head, te)}
        if a.head == "tl-tr":
            rec["layer_probe"] = ev(start_with(np.eye(L)[st.info["layer"]], tr, "wa-tr"), te)
            run_gain = W.ROUTE_GAIN
            for g in (float(v) for v in a.gains.split(",")):
                if g == run_gain:   # the run's own start, fitted above
                    rec[f"gain{g:g}"] = rec["start"]
                    continue
                W.ROUTE_GAIN = g    # read by warmstart.route_layers when the start is fitted
                torch.manual_seed(0)
                rec[f"gain{g:g}"] = ev(W.Start(build_head(a.head, L, D, K), store, tr, cache.folds, y, ml, seed=0).start, te)
            W.ROUTE_GAIN = run_gain
            print(json.dumps(rec), flush=True)
            continue
        rec["per_layer"] = [ev(start_with(np.eye(L)[k], tr), te) for k in range(L)]
        for tau in (float(v) for v in a.taus.split(",")):
            wts = np.exp((inner - inner.max()) / tau)
            rec[f"soft{tau:g}"] = ev(start_with(wts / wts.sum(), tr), te)
        rec["uniform"] = ev(start_with(np.full(L, 1 / L), tr), te)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
