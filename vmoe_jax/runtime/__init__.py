"""The device mesh and array layout, multi-process setup, and the allocator of CPU hosts."""
