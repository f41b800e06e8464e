"""Audio in, model inputs out: decoding, utterances, ASR, text and acoustic features."""
