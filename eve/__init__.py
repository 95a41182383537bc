"""EVE-kit: encoder-free vision-language models (EVE, arXiv 2406.11832).

`import eve` registers the model with transformers' Auto classes (model_type "eve").
"""

from eve._torchvision_guard import install as _install_torchvision_guard

_install_torchvision_guard()  # before anything imports transformers

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from eve.configuration_eve import FLAVORS, EveConfig  # noqa: E402
from eve.configuration_eve2 import EVE2_FLAVORS, Eve2Config  # noqa: E402
from eve.image_io import InvalidImageError, load_image  # noqa: E402
from eve.modeling_eve import EveForCausalLM, EveModel, EvePreTrainedModel  # noqa: E402
from eve.modeling_eve2 import Eve2ForCausalLM, Eve2Model  # noqa: E402
from eve.patch_embedding import EveVisionEmbedding, ImageFeatures  # noqa: E402
from eve.processing_eve import EveImageProcessor, EveProcessor, num_visual_tokens  # noqa: E402
from eve import templates  # noqa: E402,F401

for _config, _headless, _causal in ((EveConfig, EveModel, EveForCausalLM), (Eve2Config, Eve2Model, Eve2ForCausalLM)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _headless, exist_ok=True)  # headless: last hidden states
    AutoModelForCausalLM.register(_config, _causal, exist_ok=True)
    # pipeline("image-text-to-text") and AutoModelForImageTextToText find EVE here.
    AutoModelForImageTextToText.register(_config, _causal, exist_ok=True)
    # One PIL/numpy implementation serves both backends the Auto class knows.
    AutoImageProcessor.register(
        _config, image_processor_classes={"pil": EveImageProcessor, "torchvision": EveImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(_config, EveProcessor, exist_ok=True)
del _config, _headless, _causal

__all__ = [
    "EVE2_FLAVORS",
    "FLAVORS",
    "Eve2Config",
    "Eve2ForCausalLM",
    "Eve2Model",
    "EveConfig",
    "EveForCausalLM",
    "EveImageProcessor",
    "EveModel",
    "EvePreTrainedModel",
    "EveProcessor",
    "EveVisionEmbedding",
    "ImageFeatures",
    "InvalidImageError",
    "load_image",
    "num_visual_tokens",
]
