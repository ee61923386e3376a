"""Model evaluation: perplexity over a text with a sliding window."""
