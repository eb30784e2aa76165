"""Models: the transformer, its named configurations, tokenizers, chat formats and weight
loading."""
