"""tether — KL-regularized post-training and decoding of language models, with exact KL accounting."""

__version__ = "0.1.0"
