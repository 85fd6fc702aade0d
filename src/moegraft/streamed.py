"""A dense model that holds one module's weights at a time, filled from its Source as calibration reaches it.

In: a Source (directory, hub snapshot or .gguf, as stored: Phi-3's projections fused) and the dtype the model
would be loaded in. Out: `skeleton`, the model class built from the source's config with its parameters on the
meta device (buffers such as the rotary frequencies are computed as usual), and `StreamedWeights`, which gives
`moegraft.calibrate.ffn_inputs_by_layer` each module's weights for the time it runs and drops them after.
Calibration then holds the embedding once, one decoder layer at a time and the residual stream, never the whole
model (`benchmarks/bench_carve_recovery.py --rss`).

transformers' own way to hold less than the model (`device_map` with disk offload) puts accelerate hooks on every
module of a model loaded through `from_pretrained`; reading a module's tensors through the Source convert has
already opened is one `Source.get` per tensor and works the same for every source convert reads (GGUF too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moegraft.calibrate import LoadedWeights
from moegraft.errors import SourceError
from moegraft.io.source import Source


def skeleton(config: dict, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """The causal LM `config` (a config.json dict) describes, in eval mode, parameters on meta in `dtype` and
    buffers (the rotary frequencies) on `device`, where StreamedWeights puts each module's weights."""
    try:
        cfg = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    except KeyError:
        raise SourceError(f"transformers has no model type {config.get('model_type')!r}") from None
    with (
        init_empty_weights()
    ):  # parameters only: buffers (rotary inv_freq) are real, as from_pretrained has them
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    device = torch.device(device)
    if (
        device.type != "cpu"
    ):  # Module.to would try to copy the meta parameters too: move the real buffers alone
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[name] = buf.to(device)
    return model.eval()


class StreamedWeights(LoadedWeights):
    """A skeleton's module weights read from `source` for the time the module is held, then put back on meta.

    Values are what `from_pretrained(dtype=...)` would hold (the stored tensor cast to each parameter's dtype),
    so calibrating the skeleton gives the numbers calibrating the whole loaded model gives. They are put on
    `device` (the skeleton's, `skeleton(..., device)`): on a GPU only the held module's weights are there.
    """

    def __init__(self, model: nn.Module, source: Source, device: torch.device | str = "cpu"):
        self.source = source
        self.device = torch.device(device)
        self._names = {m: name for name, m in model.named_modules()}

    @contextmanager
    def held(self, module: nn.Module) -> Iterator[None]:
        prefix = self._names[module]
        empty = module.state_dict()  # meta tensors of the right shapes and dtypes
        full = {}
        for key, t in empty.items():
            name = f"{prefix}.{key}"
            try:
                value = self.source.get(name)
            except KeyError:
                raise SourceError(
                    f"{self.source.origin}: no tensor {name}; the checkpoint does not match its config"
                ) from None
            if tuple(value.shape) != tuple(t.shape):
                raise SourceError(
                    f"{self.source.origin}: {name} is {tuple(value.shape)}, but config.json gives {tuple(t.shape)}"
                )
            full[key] = value.to(device=self.device, dtype=t.dtype)
        module.load_state_dict(full, assign=True)
        del full
        try:
            yield
        finally:
            module.load_state_dict(empty, assign=True)  # back to meta: the weights' memory is freed
