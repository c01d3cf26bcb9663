"""The model zoo: mdistiller's CIFAR architectures plus any torchvision (`tv:`) or timm (`timm:`) model.

Every model's forward(x) returns (logits, pooled_features), with logits = final Linear(pooled_features).
"""

from .checkpoint import (
    file_sha256,
    load_checkpoint,
    read_checkpoint,
    remove_unfinished_writes,
    save_checkpoint,
    written_atomically,
)
from .zoo import create_model

__all__ = ["create_model", "file_sha256", "load_checkpoint", "read_checkpoint",
           "remove_unfinished_writes", "save_checkpoint", "written_atomically"]
