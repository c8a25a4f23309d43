"""Where models come from: loading, named models, GGUF conversion, the reference LM."""
