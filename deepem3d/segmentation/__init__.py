"""Pure array algorithms: supervoxels, region graph, agglomeration, metrics. No I/O."""
