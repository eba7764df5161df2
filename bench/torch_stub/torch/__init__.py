"""Stands in for torch in WhisperLive's benchmark environment only.

WhisperLive's faster-whisper server path imports torch just to ask torch.cuda.is_available().
On a CPU-only machine the answer is False either way; this project installs torch nowhere.
"""


class cuda:
    @staticmethod
    def is_available() -> bool:
        return False
