"""wat-robust: the Whisper-AT noise-robustness experiment (paper section 3, figures 1 and 2).

Speech is mixed with single-label noise clips at several SNRs; one encoder pass per mixture gives
both the transcript (batched `whisper.decode`) and the pooled layer features (a standard wat cache);
WER per SNR and noise class is related to how well a probe recognises each noise class."""
from wat.data.lazy import lazy_names

# eager (numpy only), and first: the function `mix` shares its module's name
from .mix import MixError, assign_noise, mix, snr_db

__all__ = ["run_robust", "RobustOptions", "RobustError", "load_speech", "Speech", "Utterance", "SpeechError",
           "mix", "snr_db", "assign_noise", "MixError", "errors", "corpus", "normalize", "Errors"]
# loaded on first use: `wat-robust --help` imports no torch or whisper
__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(("run_robust", "RobustOptions", "RobustError"), "run"),
    **dict.fromkeys(("load_speech", "Speech", "Utterance", "SpeechError"), "speech"),
    **dict.fromkeys(("errors", "corpus", "normalize", "Errors"), "wer")}, __all__)
