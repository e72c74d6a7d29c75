"""The shape of a model, read without building it: from a local Hugging Face folder or ``config.json``, or from an
InternEvo-style config file (``seqpack train``'s), never downloading anything.

Shape legend: h hidden size, L decoder layers, N query heads, Nkv key/value heads, D head dim, i MLP intermediate
size, V vocabulary.

    >>> shape = load_shape("configs/demo.py")                          # doctest: +SKIP
    >>> shape.hidden_size, shape.num_layers, shape.vocab_size          # doctest: +SKIP
    (128, 4, 4096)
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

# Llama-shaped decoders (pre-norm RMSNorm, q/k/v/o projections, RoPE, gated MLP) whose saved tensors the planner
# counts; ``qk_norm`` families also normalise q and k per head. MoE, softcapped and ALiBi families are refused.
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {"qk_norm": True}, "internlm": {}, "internlm2": {},
            "baichuan": {}}


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a decoder-only causal LM."""

    model_type: str
    hidden_size: int  # h
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # Nkv
    head_dim: int  # D
    intermediate_size: int  # i
    vocab_size: int  # V
    tie_embeddings: bool = False
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model shape: {name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape: num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: q/k/v/o projections, gated MLP, two norms (+ q/k norms)."""
        h, D = self.hidden_size, self.head_dim
        attn = h * D * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attn + 3 * h * self.intermediate_size + 2 * h + (2 * D if self.qk_norm else 0)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, output head (unless tied)."""
        return self.embedding_params * (1 if self.tie_embeddings else 2) + self.hidden_size

    @property
    def params(self) -> int:
        return self.num_layers * self.layer_params + self.root_params


def shape_from_hf_config(config, where: str = "config") -> ModelShape:
    """ModelShape of a transformers config (text part of multimodal configs)."""
    text = getattr(config, "get_text_config", lambda: config)()
    model_type = getattr(text, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported by seqpack plan; it counts the "
                         f"activations of Llama-shaped decoders: {', '.join(FAMILIES)}")
    n = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n
    return ModelShape(model_type=model_type, hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
                      num_heads=n, num_kv_heads=getattr(text, "num_key_value_heads", None) or n, head_dim=head_dim,
                      intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
                      tie_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
                      **FAMILIES[model_type])


def shape_from_config_json(path: str | Path) -> ModelShape:
    """ModelShape of a Hugging Face ``config.json`` (or the folder holding it). Nothing is downloaded."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"{file} not found: give a local Hugging Face model folder (with config.json), a "
                         "config.json, or an InternEvo-style config file (.py)")
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not readable JSON: {err}") from err
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported by seqpack plan; it counts the "
                         f"activations of Llama-shaped decoders: {', '.join(FAMILIES)}")
    import seqpack  # noqa: F401  (registers the native InternLM / InternLM2 / Baichuan configs)
    from transformers import AutoConfig

    raw = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "architectures")}
    config = AutoConfig.for_model(model_type, **raw)
    aliases = getattr(config, "attribute_map", {})  # e.g. a family's own name for hidden_size
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in raw and not any(aliases.get(a) == k for a in raw)]
    if missing:  # transformers would fill in its defaults (hidden_size 4096, ...): a plan of some other model
        raise ValueError(f"{file} does not set {', '.join(missing)}; the plan needs the model's own architecture, "
                         "not transformers' defaults: use the config.json of the model folder")
    return shape_from_hf_config(config, str(file))


def load_shape(source: str | Path, vocab_size: int | None = None) -> tuple[ModelShape, object | None]:
    """(shape, seqpack Config or None) of a model folder, a ``config.json``, or an InternEvo-style ``.py`` config.

    A ``.py`` config gives the from-scratch architecture of its ``model`` section, or the local folder of
    ``ckpt.load_ckpt_info`` for ``*_FROM_HF`` model types; its Config is returned too (sequence length, sp,
    checkpointing and dtype defaults come from it). ``vocab_size`` overrides a config whose vocabulary is left to
    the tokenizer (default: the embedded tokenizer's 4096 when no tokenizer is named).
    """
    source = Path(source)
    if source.suffix != ".py":
        return shape_from_config_json(source), None
    from ..data.corpus import VOCAB_SIZE
    from ..train.config_load import load_config
    from ..train.config_rules import from_hf
    from ..train.model import hf_config, model_source

    with warnings.catch_warnings():  # InternEvo keys without effect: `seqpack train` reports them, not the plan
        warnings.simplefilter("ignore")
        cfg = load_config(source)
    if from_hf(cfg):
        folder = model_source(cfg)
        if not (Path(folder) / "config.json").is_file():
            raise ValueError(f"{source}: ckpt.load_ckpt_info.path={folder!r} has no config.json here; the plan "
                             "reads the architecture from that local folder (copy its config.json there, or pass "
                             "the folder or a config.json directly)")
        return shape_from_config_json(folder), cfg
    vocab = cfg.model.vocab_size or vocab_size
    if vocab is None:
        if cfg.data.tokenizer_path is not None:
            raise ValueError(f"{source}: model.vocab_size is not set, so the tokenizer at {cfg.data.tokenizer_path} "
                             "decides it at train time; set model.vocab_size in the config or pass --vocab-size")
        vocab = VOCAB_SIZE  # the embedded corpus tokenizer
    return shape_from_hf_config(hf_config(cfg, vocab), str(source)), cfg
