"""The PyTorch front ends: the DDP communication hook, `DoubleSqueezeAdamW`, and the Hugging Face Trainer and
Lightning callbacks.

See docs/ARCHITECTURE.md section 2 for the layout and the direction of imports."""
