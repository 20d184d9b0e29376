"""Monitoring: per-round statistics and the TensorBoard writer.

See docs/ARCHITECTURE.md section 2 for the layout and the direction of imports."""
