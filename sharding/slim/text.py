"""The bundled text, split once into a calibration part and a held-out part.

``sharding/convert/data/perplexity.txt`` is eight short essays. Every slimming
method calibrates (AWQ/GPTQ activations, pruning importance, recovery and
distillation training) on the first five and every quality figure is
measured on the last three, so no method is scored on text it has seen.
The split is at a section title, not a token count, so it is the same for
every tokenizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from edgemesh.errors import ConfigError, SlimInputError

HELDOUT_FROM = "On Learning a Craft"
"""Title of the first held-out section; everything before it is calibration."""


def _bundled() -> str:
    from edgemesh.sharding.convert.run import eval_text

    return eval_text()


def _split() -> tuple[str, str]:
    text = _bundled()
    at = text.find(f"\n{HELDOUT_FROM}\n")
    if at < 0:  # the bundled file changed under us: refuse rather than mix the parts
        raise ConfigError(f"the bundled text has no section '{HELDOUT_FROM}' to split at")
    return text[:at].strip() + "\n", text[at:].strip() + "\n"


def calibration_text() -> str:
    """Sections 1-5 of the bundled text (the default ``--calibration``)."""
    return _split()[0]


def heldout_text() -> str:
    """Sections 6-8 of the bundled text: what every quality figure is measured on."""
    return _split()[1]


def digest(text: str) -> str:
    """16 hex chars of the text's sha256, recorded in the manifest."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Calibration:
    """Calibration text, its token ids and where it came from."""

    text: str
    ids: list[int]
    source: str
    """A path, or ``"bundled:calibration"``."""

    @property
    def digest(self) -> str:
        return digest(self.text)

    def to_dict(self) -> dict[str, object]:
        return {"source": self.source, "sha256_16": self.digest, "tokens": len(self.ids)}


def load_calibration(
    path: Path | str | None, tokenizer: object, need_tokens: int, method: str
) -> Calibration:
    """Read and tokenize the calibration text; refuse one that is too short or
    that contains the held-out text (it would score the method on what it saw)."""
    if path is None:
        text, source = calibration_text(), "bundled:calibration"
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"calibration text '{file}' does not exist")
        text, source = file.read_text("utf-8", errors="replace"), str(file)
    probe = heldout_text().splitlines()[2][:120]  # a sentence of the first held-out essay
    if probe and probe in text:
        raise SlimInputError(
            f"calibration text '{source}' contains the held-out part of the bundled text",
            hint=f"calibrate on other text; quality is measured from '{HELDOUT_FROM}' on",
        )
    ids = list(tokenizer.encode(text))  # type: ignore[attr-defined]
    if len(ids) < need_tokens:
        raise SlimInputError(
            f"calibration text '{source}' has {len(ids)} tokens; {method} needs at least "
            f"{need_tokens}",
            hint=f"pass a longer --calibration (about {need_tokens * 5} characters of prose)",
        )
    return Calibration(text, ids, source)


def windows(ids: list[int], length: int, count: int) -> list[list[int]]:
    """Up to ``count`` non-overlapping windows of ``length`` tokens, from the start."""
    return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:count]
