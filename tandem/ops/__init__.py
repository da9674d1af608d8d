"""Operating processes on this machine: supervision (`procs`), the local multi-process stack
(`local_stack`) and a Ray cluster of several nodes on one machine (`ray_cluster`).

May import every package; the runtimes never import it.
"""
