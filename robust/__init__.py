"""wat-robust: the Whisper-AT noise-robustness experiment (paper section 3, figures 1 and 2).

Speech is mixed with single-label noise clips at several SNRs; one encoder pass per mixture gives
both the transcript (batched `whisper.decode`) and the pooled layer features (a standard wat cache);
WER per SNR and noise class is related to how well a probe recognises each noise class."""
from .mix import MixError, assign_noise, mix, snr_db
from .run import RobustError, RobustOptions, run_robust
from .speech import Speech, SpeechError, Utterance, load_speech
from .wer import Errors, corpus, errors, normalize

__all__ = ["run_robust", "RobustOptions", "RobustError", "load_speech", "Speech", "Utterance", "SpeechError",
           "mix", "snr_db", "assign_noise", "MixError", "errors", "corpus", "normalize", "Errors"]
