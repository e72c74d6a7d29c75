"""Config base for the native families: official ``config.json`` keys in, official keys (with ``auto_map``) out."""

from __future__ import annotations

from transformers import PretrainedConfig


class NativeConfig(PretrainedConfig):
    """A ``PretrainedConfig`` that always writes the published ``auto_map`` (so the folder ``save_pretrained``
    writes has the official layout) and checks the head layout once.

    ``rope_scaling`` is stored as given (``{"type": "dynamic"|"linear", "factor": f}``): the published InternLM2
    modeling code reads that exact dict, so transformers' RoPE standardisation (``rope_parameters``) is bypassed.
    """

    official_auto_map = {}  # class attribute (no annotation: configs are dataclasses in transformers 5)

    def __init__(self, **kwargs):
        kwargs.setdefault("auto_map", dict(self.official_auto_map))
        super().__init__(**kwargs)

    @property
    def rope_scaling(self):
        return self.__dict__.get("rope_scaling")

    @rope_scaling.setter
    def rope_scaling(self, value):
        self.__dict__["rope_scaling"] = value

    def to_diff_dict(self) -> dict:
        diff = super().to_diff_dict()
        diff.setdefault("auto_map", self.auto_map)
        return diff

    def check_heads(self, num_kv_heads: int | None = None) -> None:
        n = self.num_attention_heads
        if n < 1 or self.hidden_size % n:
            raise ValueError(f"{type(self).__name__}: hidden_size={self.hidden_size} must be a positive multiple of "
                             f"num_attention_heads={n}")
        if num_kv_heads is not None and (num_kv_heads < 1 or n % num_kv_heads):
            raise ValueError(f"{type(self).__name__}: num_attention_heads={n} must be a multiple of "
                             f"num_key_value_heads={num_kv_heads}")


def rope_scaling_type(rope_scaling: dict | None, where: str) -> tuple[str | None, float]:
    """Validate a published ``rope_scaling`` dict -> (type or None, factor)."""
    if rope_scaling is None:
        return None, 1.0
    if not isinstance(rope_scaling, dict) or rope_scaling.get("type", rope_scaling.get("rope_type")) not in (
            "linear", "dynamic") or not isinstance(rope_scaling.get("factor"), (int, float)):
        raise ValueError(f"{where}: rope_scaling must be {{'type': 'linear'|'dynamic', 'factor': number}}, got "
                         f"{rope_scaling!r}")
    if rope_scaling["factor"] < 1:
        raise ValueError(f"{where}: rope_scaling factor must be >= 1, got {rope_scaling['factor']}")
    return rope_scaling.get("type", rope_scaling.get("rope_type")), float(rope_scaling["factor"])
