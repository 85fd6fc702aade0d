"""A .gguf file read as a `Source`: the config and tensor names of the model transformers builds from it.

In: a GGUF path (memory-mapped). Out: float32 tensors, each dequantised from one GGUF tensor when asked for.
"""

from __future__ import annotations

import functools
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch

from moegraft.errors import SourceError

# Legacy-loader processors that merge or split tensors (GGUF expert stacks), so one GGUF tensor is not one HF
# tensor; all belong to models that are already mixtures of experts.
_MOE_PROCESSORS = {"Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor"}
# Keys of transformers' GGUF mapping that are metadata sections, not architectures.
_NOT_ARCHITECTURES = {"general", "tokenizer"}


class GGUFSource:
    """A local .gguf checkpoint, dequantised tensor by tensor exactly as transformers' GGUF loader does it.

    `config` is the transformers config dict of the model `from_pretrained(dir, gguf_file=name)` builds, with
    `architectures` set and `dtype` float32; names and tensors match that model's state dict (no `lm_head.weight`
    when the embeddings are tied).
    """

    def __init__(self, path: str | Path, origin: str | None = None):
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        self.path = Path(path)
        self.origin = origin or str(path)
        self._reader = _open_reader(self.path)
        architecture = self._architecture()
        # The parsed metadata (vocabulary, merges: ~10^5 small numpy objects) is a few hundred MB and not needed
        # again: transformers re-reads the file for the config and the tokenizer.
        self._reader.fields.clear()
        processor_cls = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        # Expert stacks (`ffn_*_exps`) also appear under general.architecture "llama" (llama.cpp's Mixtral).
        if processor_cls.__name__ in _MOE_PROCESSORS or any("_exps." in t.name for t in self._reader.tensors):
            raise SourceError(
                f"{self.path}: this {architecture!r} GGUF is already a mixture of experts (it has expert tensors); "
                "moegraft grafts experts onto dense models, so pass a dense checkpoint"
            )
        raw = self._legacy_config(architecture)
        try:
            config = CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw))
            model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise SourceError(
                f"{self.path}: transformers has no causal LM for GGUF model type {raw.get('model_type')!r}; "
                "moegraft converts decoder-only language models"
            ) from None
        # Names and shapes come from the model class itself, built on the meta device: no weights allocated.
        with torch.device("meta"):
            model = model_cls(config)
        config.architectures = [model_cls.__name__]
        config.dtype = torch.float32
        self._config_obj = config
        self._can_generate = model.can_generate()
        self.config = config.to_dict()
        self.config.pop("_name_or_path", None)  # a local path; transformers does not write it to config.json

        # The raw GGUF config, not the config object: it is what the legacy loader hands its processor.
        self._processor = processor_cls(config=raw)
        self._gguf_to_hf: dict[str, str] = _weights_map(model, self._processor)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        tied_keys = getattr(model, "all_tied_weights_keys", None) or model._tied_weights_keys or {}
        tied = set(tied_keys) if config.tie_word_embeddings else set()
        self._tensors = self._index(expected, tied)
        self._shapes = {name: expected[name] for name in self._tensors}
        del model

    def _architecture(self) -> str:
        field = self._reader.fields.get("general.architecture")
        if field is None:
            raise SourceError(
                f"{self.path}: not a valid GGUF model (no general.architecture key); re-download it"
            )
        return str(field.contents())

    def _legacy_config(self, architecture: str) -> dict:
        """The config dict transformers' legacy GGUF loader parses, which also drives its tensor fix-ups."""
        from transformers.integrations.gguf import GGUF_ARCHS
        from transformers.modeling_gguf_pytorch_utils import (
            GGUF_SUPPORTED_ARCHITECTURES,
            load_gguf_checkpoint,
        )

        if architecture in GGUF_ARCHS:
            # These load through transformers' packed-GGUF path, whose fix-ups are weight converters that may
            # join several GGUF tensors into one; moegraft does not replay those.
            raise SourceError(
                f"{self.path}: GGUF architecture {architecture!r} is not readable by moegraft yet; load it with "
                "transformers (gguf_file=...), save its state dict as safetensors with a config.json, and convert "
                "that directory"
            )
        try:
            return load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
        except ValueError as e:
            if "not supported" in str(e):
                supported = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in _NOT_ARCHITECTURES)
                raise SourceError(
                    f"{self.path}: GGUF architecture {architecture!r} is not supported by transformers' GGUF loader "
                    f"(supported: {supported}); convert the original Hugging Face checkpoint instead"
                ) from None
            raise SourceError(
                f"{self.path}: unreadable GGUF metadata ({_first_line(e)}); re-download it"
            ) from None
        except Exception as e:
            raise SourceError(
                f"{self.path}: unreadable GGUF metadata ({_first_line(e)}); re-download it"
            ) from None

    def _index(self, expected: dict[str, tuple[int, ...]], tied: set[str]) -> dict:
        """HF name -> GGUF reader tensor, in the model's state-dict order, checked against the model's shapes."""
        found = {}
        for t in self._reader.tensors:
            hf_name = self._gguf_to_hf.get(t.name)
            if hf_name is None:
                continue  # transformers drops these too (e.g. llama.cpp's precomputed rope_freqs)
            # Element counts, since some processors reshape (GPT-2 transposes, Mamba adds a dim).
            if hf_name not in expected or int(np.prod(t.shape)) != int(np.prod(expected[hf_name])):
                raise SourceError(
                    f"{self.path}: GGUF tensor {t.name} has shape {tuple(reversed(t.shape.tolist()))}, but "
                    f"{hf_name} needs {expected.get(hf_name)}; the file does not match its own metadata, re-download it"
                )
            found[hf_name] = t
        missing = [name for name in expected if name not in found and name not in tied]
        if missing:
            # transformers would only warn and leave these randomly initialised; a conversion must not.
            raise SourceError(
                f"{self.path}: no GGUF tensor for {missing[0]} ({len(missing)} missing); re-download the file, "
                "or convert the original Hugging Face checkpoint if transformers' GGUF mapping lacks it"
            )
        return {name: found[name] for name in expected if name in found}

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        if name not in self._tensors:
            raise KeyError(name)
        # Every GGUF type is dequantised to float32, as transformers does when asked for dtype=float32.
        return torch.float32

    def get(self, name: str) -> torch.Tensor:
        """Dequantise one GGUF tensor and apply transformers' fix-ups (e.g. undo llama.cpp's Q/K permutation)."""
        from gguf import dequantize

        t = self._tensors[name]
        try:
            weights = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise SourceError(
                f"{self.path}: cannot dequantise {t.name} ({_first_line(e)}); re-download it"
            ) from None
        # A processor may store its output itself rather than return it (GPT-2's lm_head), so give it a slot.
        parsed: dict[str, dict] = {"tensors": {}}
        result = self._processor.process(
            weights=weights, name=t.name, tensor_key_mapping=self._gguf_to_hf, parsed_parameters=parsed
        )
        if result.name is None:
            tensor = parsed["tensors"].pop(name)
        else:
            weights = result.weights
            # F32 tensors come back as read-only views of the memory map; dequantised ones are fresh arrays,
            # which need no second copy (transformers copies them again; that only raises peak memory).
            if not (weights.flags.writeable and weights.flags.c_contiguous):
                weights = np.copy(weights)
            tensor = torch.from_numpy(weights)
        tensor = tensor.to(torch.float32)
        if tuple(tensor.shape) != self._shapes[name]:
            raise SourceError(
                f"{self.path}: {t.name} dequantises to shape {tuple(tensor.shape)}, but {name} needs "
                f"{self._shapes[name]}; re-download it"
            )
        return tensor

    def copy_aux(self, out_dir: Path) -> None:
        """Write the tokenizer transformers rebuilds from the GGUF metadata, and the generation config it derives."""
        from transformers import AutoTokenizer, GenerationConfig

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name)
        except Exception as e:
            raise SourceError(
                f"{self.path}: transformers cannot rebuild the tokenizer from this GGUF ({_first_line(e)}); "
                "copy a tokenizer from the original model into the output"
            ) from None
        tokenizer.save_pretrained(out_dir)
        if self._can_generate:
            # What the model's own save_pretrained would write: generation defaults from the config's token ids.
            GenerationConfig.from_model_config(self._config_obj).save_pretrained(out_dir)

    def close(self) -> None:
        # Dropping the reader drops its memory map (numpy unmaps when the last view goes).
        self._reader = None
        self._tensors = {}


def memoised_name_map():
    """Context in which gguf's name table is built once per (architecture, layer count).

    transformers' `get_gguf_hf_weights_map` recurses into every submodule and rebuilds gguf's name table at each
    one (~400 times for a 30-layer model: most of a GGUF open, minutes for Gemma 3 on a busy machine); the table
    depends only on its arguments, so it is memoised while the context lasts (process-wide; moegraft opens
    sources on one thread).
    """
    import gguf

    return patch.object(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))


def _weights_map(model: torch.nn.Module, processor) -> dict[str, str]:
    """GGUF name -> HF name, from transformers' own `get_gguf_hf_weights_map` (name table memoised)."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with memoised_name_map():
        return get_gguf_hf_weights_map(model, processor)


def _open_reader(path: Path):
    """A `gguf.GGUFReader` over the file, with any parse failure turned into one SourceError line."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except OSError as e:
        raise SourceError(
            f"{path}: cannot read the file ({e.strerror or e}); check its path and permissions"
        ) from None
    except Exception as e:  # gguf raises ValueError/IndexError/... for bad magic, versions, truncation
        raise SourceError(f"{path}: not a valid GGUF file ({_first_line(e)}); re-download it") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
