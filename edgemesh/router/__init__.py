"""The router: a model's layer ranges on the mesh's boxes, pipelined (see docs/ROUTER.md).

    artifacts     fetch a stage's files onto its box, sha256-verified, per-box cache
    stage         StageWorker: one backend on one box; merges waiting micro-batches
    placement     Placer: stage specs from a plan, and again after a box is lost
    ray_pipeline  RayPipeline: the engine's Pipeline over stage actors; replay on loss
    service       a deployed model as a gateway ModelService (single-box fallback)
    serve         the mesh gateway on Ray Serve
    deploy        `edgemesh deploy`: profiles -> plan -> artifacts -> gateway -> records

Nothing here imports Ray at module level.
"""
