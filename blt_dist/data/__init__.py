"""The data plane: byte shards, entropy shards, patching, calibration and loaders."""
