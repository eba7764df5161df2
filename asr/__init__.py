"""Speech side of the server: VAD, segmentation, the shared Whisper engine, streaming."""
