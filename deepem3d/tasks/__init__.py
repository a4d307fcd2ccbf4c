"""Queue tasks (thin: read, call a pure function, write) and the functions that create them.

Importing this package registers every task with taskqueue, which is what a worker needs.
"""

from deepem3d.tasks import downsample, inference, markers, segmentation  # noqa: F401  (registers the tasks)
