"""STMI: segmentation-guided token modulation with cross-modal hypergraph interaction for multi-modal ReID.

Pure PyTorch + open_clip + pillow. Importing ``stmi`` never imports ray, mlflow, optuna or boto3.
"""

from stmi.config import DataConfig, EvalConfig, LossConfig, ModelConfig, OptimConfig, STMIConfig

__version__ = "0.1.0"
__all__ = ["DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig", "STMIConfig", "__version__"]
