"""Models: how each kind of weights file loads (GGUF, Hugging Face directories, sentence
encoders), their tokenizers, and the Llama-family model itself."""
