"""wat-robust: the Whisper-AT noise-robustness experiment (paper section 3) on your speech, noise and
models: WER of noisy speech per SNR and noise class, and how well the encoder's layers recognise
the background sound, from one encoder pass per mixture."""
from __future__ import annotations

import argparse
import math

from wat.data.clikit.args import (MODEL_HELP, add_device, add_encoding, add_model, add_out, add_workers, comma_list_of,
                                  int_range, nonempty, parse_args, positive_int, seed_int)
from wat.data.clikit.main import run_command

DATASETS = ("esc50", "json", "folder", "csv")  # wat dataset kinds that can be single-label


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wat-robust", description=__doc__,
        epilog="Rerunning the same command resumes: finished chunks of mixtures are kept. Outputs: "
               "OUT/report.html (all on one page), wer.csv, wer_vs_snr.png, classwise.png, layers.png, summary.json, "
               "problems.tsv and "
               "one wat cache per model (OUT/MODEL/feats.h5, usable with wat-probe).")
    p.add_argument("--speech", required=True, type=nonempty("speech folder or CSV"),
                   help="LibriSpeech-layout folder (SPEAKER/CHAPTER/*.flac + *.trans.txt) or a path,text CSV")
    p.add_argument("--noise-dataset", required=True, choices=DATASETS, help="kind of the noise dataset (single-label)")
    p.add_argument("--noise-root", required=True, type=nonempty("dataset folder"), help="noise dataset folder (e.g. ESC-50)")
    p.add_argument("--noise-manifest", type=nonempty("manifest path"), help="manifest of the noise dataset, when not in its usual place")
    add_encoding(p, "transcripts, speech CSV and noise manifest")
    add_model(p, MODEL_HELP + "; or a CTC fine-tuned (*ForCTC) Hugging Face wav2vec2 / HuBERT / WavLM / "
                 "data2vec-audio folder or id (facebook/wav2vec2-base-960h; greedy CTC with its own tokenizer); "
                 "repeat to compare models on the same mixtures", repeat=True)
    p.add_argument("--snr", type=comma_list_of(float, what="number (dB)"), default="20,10,5,0,-5,-10",
                   help="SNRs in dB, comma-separated (default: the paper's)")
    add_out(p, "output folder (see below)")
    p.add_argument("--noise-per-utterance", type=int_range(1, 1000), default=1,
                   help="noise clips (of different classes) mixed with each utterance (default 1)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the noise assignment")
    p.add_argument("--language", default="en", help="language of the speech, or 'auto' to detect it (default en)")
    p.add_argument("--noise-policy", choices=("trim", "pad30"), default="trim",
                   help="features of the noise clips alone for the class-wise probe (default trim, the paper's)")
    add_device(p)
    p.add_argument("--batch-size", type=int_range(1, 4096), default=16, help="utterances per decoding batch (default 16)")
    p.add_argument("--chunk-size", type=int_range(1, 1_000_000), default=64,
                   help="mixtures per shard, the unit of resumption (default 64)")
    add_workers(p, "--jobs", default=1, help="probe worker processes (default 1)")
    p.add_argument("--limit", type=positive_int, help="only the first N utterances (sorted by id)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs made with other settings")
    return p




def main(argv=None) -> int:
    return run_command("wat-robust", lambda: _main(argv), interrupted="rerun the same command to resume")


def _main(argv) -> int:
    p = parser()
    a = parse_args(p, argv)
    from .report import speech_line
    from .run import RobustError, RobustOptions, run_robust

    try:
        options = RobustOptions(
            models=tuple(a.model), snrs=a.snr, noise_per_utterance=a.noise_per_utterance, seed=a.seed,
            device=a.device, batch_size=a.batch_size, chunk_size=a.chunk_size, limit=a.limit,
            language=None if a.language == "auto" else a.language, noise_policy=a.noise_policy, jobs=a.workers,
            overwrite=a.overwrite, encoding=a.encoding)
        options.check()
        if options.language is not None:
            from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE
            code = TO_LANGUAGE_CODE.get(options.language.lower(), options.language.lower())
            if code not in LANGUAGES:
                raise RobustError(f"--language: unknown language {a.language!r}")
            options.language = code
    except (ValueError, RobustError) as e:
        p.error(str(e))
    summary = run_robust(a.speech, a.noise_dataset, a.noise_root, a.out, options, noise_manifest=a.noise_manifest)
    print(f"{summary['mixtures_per_model']} mixtures per model ({summary['speech']['utterances_planned']} utterances x "
          f"{summary['noise_per_utterance']} noise clip(s) x {len(summary['snrs'])} SNRs); "
          f"{speech_line(summary['speech'])}; {summary['problems']} problem rows (see {a.out}/problems.tsv)")
    for name, m in summary["models"].items():
        wer = ", ".join(f"{s} dB {_pct(v)}" for s, v in m["wer"].items())
        print(f"{name}: WER {wer}")
        c = m["classwise"]
        if c["pearson_r"] is not None:
            print(f"{name}: class-wise WER increase vs last-layer noise F1: Pearson r = {c['pearson_r']:.3f} "
                  f"(p = {c['p_value']:.3g}, {c['n_classes']} classes)")
        else:
            print(f"{name}: class-wise correlation undefined ({c.get('note', '')})")
    print(f"outputs in {a.out}: {', '.join(summary['files'])}")
    return 0


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


if __name__ == "__main__":
    raise SystemExit(main())
