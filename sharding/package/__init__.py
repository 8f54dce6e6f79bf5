"""The package format: manifest, the package folder, its tokenizer, the range cache.

Everything a runtime needs to read a converted model; below ``backends/``.
"""
