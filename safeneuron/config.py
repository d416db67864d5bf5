"""Configuration dataclasses for every stage, loadable from TOML or YAML.

Each field has a default and a docstring-style comment; the CLI flags mirror them.
"""

from __future__ import annotations

from safeneuron.errors import SafeneuronError

import difflib
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["IdentifyConfig", "ConfigError", "from_dict", "load_config_file", "settings_hash"]


class ConfigError(SafeneuronError):
    """A configuration value or key is invalid."""


@dataclass
class IdentifyConfig:
    """Settings of safety-neuron identification."""

    model: str | None = None
    """Hub id or local directory; None = the embedded default model."""
    harmful: str | None = None
    """Harmful prompts: file, ``hf:<name>`` or ``builtin:harmful`` (default)."""
    harmless: str | None = None
    """Harmless prompts: file, ``hf:<name>`` or ``builtin:harmless`` (default)."""
    prompt_column: str | None = None
    """Prompt column of the files (detected when None)."""
    method: str = "stats"
    """``stats`` (ES + SAS, closed form, streaming) or ``neurostrike`` (logistic probes)."""
    position: str = "max"
    """Token pooling per prompt: ``max`` over the prompt, ``last`` token, or ``mean``."""
    tau_es: float | None = None
    """ES (Cohen's d) threshold; None = 3 for Qwen models, 2 for other families."""
    tau_sas: float = 2.0
    """SAS z-score threshold within a layer."""
    select: str = "threshold"
    """``threshold`` (d > tau_es) or ``t`` (one-sided T test with ``correction`` at ``alpha``) for the ES set."""
    alpha: float = 0.05
    """Family-wise (bonferroni) or false-discovery (bh) level when ``select = "t"``."""
    correction: str = "bh"
    """``bh`` (Benjamini-Hochberg) or ``bonferroni``."""
    top_frac: float | None = None
    """Optional cap: keep at most this fraction of each layer's neurons per set (highest scores)."""
    batch_size: int = 16
    max_length: int = 512
    """Prompts longer than this many tokens are truncated from the left (with a warning)."""
    max_prompts: int | None = None
    """Use at most this many prompts per class (seeded sample)."""
    by_category: bool = False
    """Also identify safety neurons per harm category (harmful category vs all harmless)."""
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    neurostrike_epochs: int = 5000
    """Full-batch Adam epochs per probe (NeuroStrike's published setting)."""
    neurostrike_z: float = 3.0
    """NeuroStrike's z-score threshold on probe weights."""
    checkpoint_every: int = 8
    """Save partial statistics every this many batches (resume after a kill)."""
    stats_device: str = "cpu"
    """Where the float64 accumulators live: ``cpu`` (offloaded) or ``model`` (the model's device; faster on GPU)."""

    def validate(self) -> None:
        if self.method not in ("stats", "neurostrike"):
            raise ConfigError(f"method must be 'stats' or 'neurostrike', got {self.method!r}")
        if self.position not in ("max", "last", "mean"):
            raise ConfigError(f"position must be max, last or mean, got {self.position!r}")
        if self.tau_es is not None and not self.tau_es > 0:
            raise ConfigError(f"tau_es must be > 0, got {self.tau_es}")
        if not self.tau_sas > 0:
            raise ConfigError(f"tau_sas must be > 0, got {self.tau_sas}")
        if self.select not in ("threshold", "t"):
            raise ConfigError(f"select must be 'threshold' or 't', got {self.select!r}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.correction not in ("bh", "bonferroni"):
            raise ConfigError(f"correction must be 'bh' or 'bonferroni', got {self.correction!r}")
        if self.top_frac is not None and not 0 < self.top_frac <= 1:
            raise ConfigError(f"top_frac must be in (0, 1], got {self.top_frac}")
        if self.stats_device not in ("cpu", "model"):
            raise ConfigError(f"stats_device must be 'cpu' or 'model', got {self.stats_device!r}")
        if self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("batch_size and max_length must be >= 1")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise ConfigError(f"max_prompts must be >= 2 (variances need two prompts per class), got {self.max_prompts}")


def from_dict(cls, data: dict[str, Any], where: str = "config"):
    """Build a config dataclass, rejecting unknown keys with the closest valid one."""
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    obj = cls(**data)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML ({err})") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    raise ConfigError(f"{path}: config must be .toml, .yaml or .yml")


def settings_hash(obj, exclude: tuple[str, ...] = ()) -> str:
    """Stable hash of a config's values (fields in ``exclude`` ignored)."""
    from safeneuron.artifacts import sha256_text
    import json

    data = {k: v for k, v in asdict(obj).items() if k not in exclude}
    return sha256_text(json.dumps(data, sort_keys=True, default=str))[:16]
