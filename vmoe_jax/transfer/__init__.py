"""Starting from other weights: parameter mapping, `.npz` releases, resizing, distillation."""
