"""edgemesh: turn a room of mismatched edge boxes into one LLM serving mesh.

Importing this package is cheap on purpose: no inference runtime, Ray or
zeroconf is imported until the code that needs it runs.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
