"""Graph models: vision and other fixed-graph networks served over the Open
Inference Protocol (KServe v2).

An *imported graph package* is one folder: ``graph.json`` (the manifest, see
``manifest.py``), the fp32 ONNX graph, each produced precision (fp16, int8
QDQ) and, per box fingerprint, the engine artifacts a backend compiled from
them (``engines/<box-key>/``). ``edgemesh import`` builds one
(``build.py``); ``edgemesh serve --model DIR`` serves it (``service.py``).

Nothing here imports a framework or runtime at module level.
"""
