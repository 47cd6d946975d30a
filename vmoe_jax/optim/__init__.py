"""Optimizers (Adafactor, AdamW, SGD with decoupled weight decay) and learning-rate schedules."""
