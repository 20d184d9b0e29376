"""DoubleSqueeze for Horovod: compressors in Horovod's API, a DistributedOptimizer that moves compressed bytes,
and the `dsq-horovodrun` flag. Not implemented yet: this package is reserved and empty until it lands."""
