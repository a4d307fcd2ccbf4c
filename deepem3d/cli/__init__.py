"""The `deepem3d` command, one module per stage (see main.py for the group)."""
