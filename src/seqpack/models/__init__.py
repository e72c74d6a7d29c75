"""Native InternLM, InternLM2 and Baichuan2 causal LMs (official checkpoint layout, seqpack attention path).

    import seqpack                                    # registers the models (seqpack.models.register_models())
    model = AutoModelForCausalLM.from_pretrained("internlm2-7b")   # official folder, no trust_remote_code
"""

from .auto import FAMILIES, load_model, register_models
from .baichuan import BaichuanConfig, BaichuanForCausalLM, BaichuanModel, alibi_slopes
from .internlm import InternLMConfig, InternLMForCausalLM, InternLMModel
from .internlm2 import InternLM2Config, InternLM2ForCausalLM, InternLM2Model
from .rope import RotaryEmbedding

__all__ = ["FAMILIES", "BaichuanConfig", "BaichuanForCausalLM", "BaichuanModel", "InternLM2Config",
           "InternLM2ForCausalLM", "InternLM2Model", "InternLMConfig", "InternLMForCausalLM", "InternLMModel",
           "RotaryEmbedding", "alibi_slopes", "load_model", "register_models"]
