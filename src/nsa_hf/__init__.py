"""nsa-hf: Native Sparse Attention (arXiv 2502.11089) as a first-class Hugging Face Transformers model.

`import nsa_hf` registers `NsaConfig` (model_type "nsa") and the models with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_nsa import NsaCache, NsaCacheLayer
from .cache_static import NsaStaticCache, NsaStaticCacheLayer
from .configuration_nsa import NsaConfig
from .convert import convert_dense_to_nsa
from .modeling_nsa import NsaForCausalLM, NsaModel, NsaPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(NsaConfig.model_type, NsaConfig, exist_ok=True)
AutoModel.register(NsaConfig, NsaModel, exist_ok=True)
AutoModelForCausalLM.register(NsaConfig, NsaForCausalLM, exist_ok=True)

__all__ = [
    "NsaCache",
    "NsaCacheLayer",
    "NsaConfig",
    "NsaForCausalLM",
    "NsaModel",
    "NsaPreTrainedModel",
    "NsaStaticCache",
    "NsaStaticCacheLayer",
    "__version__",
    "convert_dense_to_nsa",
]
