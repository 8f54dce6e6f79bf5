"""The lab: emulated boxes on one host, for tests, examples and benchmarks.

``netns`` builds network-namespace boxes joined by a bridge; ``cgroups``
gives a box a CPU quota and a memory limit; ``meshlab`` runs a real mesh
(``edgemesh join`` per box) on them; ``isolation`` runs a measurement in a
fresh worker process or on a throw-away local Ray node; ``vision_models``
holds the random-weight vision models graph tests and benchmarks import.
Nothing here is imported by the product itself.
"""
