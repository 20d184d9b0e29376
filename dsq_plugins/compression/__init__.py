"""Compression: compressors (one block in, a `Payload` of wire bytes out), their payloads and registry,
bit packing, seeded random streams and the CPU kernels (numba) with the switch that turns them off.

See docs/ARCHITECTURE.md section 2 for the layout and the direction of imports."""
