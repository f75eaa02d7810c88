"""sce-hf: Similarity Contrastive Estimation encoders for the Hugging Face ecosystem.

Importing the package registers the SCE classes with transformers' Auto classes (so `AutoModel.from_pretrained`
finds them) and for remote code (so every `save_pretrained` writes the code files and `auto_map`, and the folder
loads with `trust_remote_code=True` where this package is not installed).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_sce import SCEConfig
from .image_processing_sce import SCEImageProcessor
from .modeling_resnet3d import R3DConfig
from .modeling_sce import SCEForImageClassification, SCEModel, SCEPreTrainedModel
from .pretraining import SCEForPreTraining, SCEPreTrainingOutput
from .video_processing_sce import SCEVideoProcessor


__version__ = "0.1.0"

AutoConfig.register(SCEConfig.model_type, SCEConfig, exist_ok=True)
AutoModel.register(SCEConfig, SCEModel, exist_ok=True)
AutoModelForImageClassification.register(SCEConfig, SCEForImageClassification, exist_ok=True)
AutoImageProcessor.register(SCEConfig, image_processor_classes={"pil": SCEImageProcessor}, exist_ok=True)
# Video folders name `SCEVideoProcessor` in preprocessor_config.json; registering it under the video trunk's config
# lets AutoImageProcessor resolve that name here without remote code.
AutoImageProcessor.register(R3DConfig, image_processor_classes={"pil": SCEVideoProcessor}, exist_ok=True)

SCEConfig.register_for_auto_class()
SCEModel.register_for_auto_class("AutoModel")
SCEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
SCEImageProcessor.register_for_auto_class("AutoImageProcessor")
SCEVideoProcessor.register_for_auto_class("AutoImageProcessor")  # transformers' video processors need torchvision

__all__ = [
    "SCEConfig",
    "SCEForImageClassification",
    "SCEForPreTraining",
    "SCEImageProcessor",
    "SCEModel",
    "SCEPreTrainedModel",
    "SCEPreTrainingOutput",
    "SCEVideoProcessor",
    "__version__",
]
