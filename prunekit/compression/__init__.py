"""Compression drivers: layer loops that collect dense Hessians (`hessians`), prune
(`prune`) and quantize (`quantize`) a model held by a `forward.sources.LayerSource`."""
