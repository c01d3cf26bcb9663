"""torchvision (`tv:`) and timm (`timm:`) classifiers under the zoo's (logits, pooled_features) contract.

The library's own module is returned with its class swapped for a subclass whose forward also
returns the input of the final Linear layer. Nothing is wrapped, so parameter names and state_dict
keys stay exactly the library's and its plain state_dicts load as they are.
"""

import functools

import torch
import torchvision
from torch import nn

from richkd.pipeline.errors import UserError


class _PooledOutputMixin:
    """forward(x) -> (logits, the tensor fed to the final Linear `classifier_name`)."""

    classifier_name: str

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured.append(inputs[0])

        # hooked for this call only, so the model keeps no reference to the features afterwards
        handle = self.get_submodule(self.classifier_name).register_forward_pre_hook(capture)
        try:
            output = super().forward(x)
        finally:
            handle.remove()
        # googlenet and inception_v3 return a namedtuple with auxiliary logits while training
        return getattr(output, "logits", output), captured[-1]


@functools.cache
def _pooled_output_class(library_class: type[nn.Module]) -> type[nn.Module]:
    return type(library_class.__name__, (_PooledOutputMixin, library_class), {})


def _with_pooled_output(model: nn.Module, classifier_name: str, num_classes: int) -> nn.Module:
    classifier = model.get_submodule(classifier_name)
    model.__class__ = _pooled_output_class(type(model))
    model.classifier_name = classifier_name
    model.feature_dim = classifier.in_features
    model.num_classes = num_classes
    return model


def torchvision_model(name: str, num_classes: int) -> nn.Module:
    """Any torchvision classification model whose last Linear layer is the classifier."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown torchvision classification model 'tv:{name}'")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears or linears[-1][1].out_features != num_classes:
        raise UserError(f"'tv:{name}' is not supported: its classifier is not a final Linear layer")
    return _with_pooled_output(model, linears[-1][0], num_classes)


def timm_model(name: str, num_classes: int) -> nn.Module:
    """Any timm model whose get_classifier() is a single Linear layer."""
    import timm  # imported on demand: it is slow to import and only needed here

    if not timm.is_model(name):
        raise UserError(f"unknown timm model 'timm:{name}'")
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    classifier = model.get_classifier()
    if not isinstance(classifier, nn.Linear):
        raise UserError(f"'timm:{name}' is not supported: its classifier is not a single Linear layer")
    classifier_name = next(path for path, module in model.named_modules() if module is classifier)
    return _with_pooled_output(model, classifier_name, num_classes)
