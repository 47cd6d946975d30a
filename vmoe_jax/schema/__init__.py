"""The config schema: every key with its default, the rule of its value, the checks."""
