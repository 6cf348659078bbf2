"""Running token windows through a model: layer by layer (`layerwise`), through the chunked
output head (`head`), scored by the one scoring path (`scoring`), from a model held in memory
or streamed from disk (`sources`)."""
