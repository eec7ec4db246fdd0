"""The tabular student as a transformers model, so a serving team loads it with the Auto classes.

``fedistill export`` writes this file into the exported folder (transformers' custom-code convention), so
``AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)`` loads the student with
transformers and torch alone, without fedistill installed. It imports nothing else on purpose.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class FedistillMLPConfig(PretrainedConfig):
    model_type = "fedistill_mlp"

    def __init__(self, input_dim: int = 1, hidden: list[int] | None = None, feature_names: list[str] | None = None,
                 **kwargs) -> None:
        self.input_dim = input_dim
        self.hidden = list(hidden or [])
        self.feature_names = list(feature_names or [])
        super().__init__(**kwargs)


class FedistillMLPForSequenceClassification(PreTrainedModel):
    """Logits of a batch of feature vectors ``x`` [batch, input_dim]; the layers are named as fedistill trains
    them (``layers.<i>``), so the weights are exactly the run's student tensors."""

    config_class = FedistillMLPConfig
    main_input_name = "x"

    def __init__(self, config: FedistillMLPConfig) -> None:
        super().__init__(config)
        sizes = [config.input_dim, *config.hidden]
        modules: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            modules += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        modules.append(nn.Linear(sizes[-1], config.num_labels))
        self.layers = nn.Sequential(*modules)
        self.post_init()

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.layers(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
