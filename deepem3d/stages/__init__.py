"""The stages of the data flow, one module per arrow, on one frame (deepem3d.stages.frame):

    image -> map              inference.py     (InferenceTask)
    map -> supervoxels        supervoxels.py   (SmoothTask, HaloTask, SupervoxelTask,
                                                ReduceNodeTask, ReduceDownTask)
    supervoxels -> graph      graph.py         (RegionGraphTask)
    graph -> segments         octree.py        (OctreeNodeTask, OctreeDownTask, RemapTask)
    layer -> mip levels       downsample.py    (igneous's DownsampleTask, in MarkedTask)

inference_plan.py works out an inference run before it writes, model_refs.py names its models
and checks its workers' devices. segmentation.py plans the segmentation's stages (what a run
reuses), workdir.py is where they leave their intermediates, blocks.py the chunk-aligned block
grid they all share. Importing a task module registers its tasks with taskqueue; importing this
package imports none of them.
"""
