"""What a run writes to its workdir: checkpoints, checksums, JSON files, metrics, results."""
