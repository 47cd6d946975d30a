"""Input data: the `Dataset` type, in-memory datasets (digits, Fashion-MNIST IDX files) and TFDS."""
