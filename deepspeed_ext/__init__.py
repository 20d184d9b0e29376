"""DoubleSqueeze for DeepSpeed: the "doublesqueeze" config entry and the engine communication hook.
Not implemented yet: this package is reserved and empty until it lands."""
