"""Tools over the core: weight conversion (convert), benchmarks (bench, measure, torch_peer)."""
