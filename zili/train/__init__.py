"""Training from scratch: a byte-level BPE tokenizer and a small Llama model on one text corpus.

`zili train` (zili/commands/train.py) drives `trainer.train`; the result is a Hugging Face model
folder that zili serves and `transformers` loads. The bundled demo model, models/zili-demo, is
trained this way on the corpus `corpus.py` builds.
"""
