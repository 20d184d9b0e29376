"""The engine: the double pass block by block over flat buckets (plan, codec, bucket state, collective), its
communication thread and communicators, the worker residuals, the reference `Simulator`, and the per-tensor
policies that choose compressors (`auto`, the quality guard).

See docs/ARCHITECTURE.md section 2 for the layout and the direction of imports."""
