"""The ViT, its heads, building a model from a config, and its FLOP counts."""
