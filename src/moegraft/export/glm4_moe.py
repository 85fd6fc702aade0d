"""GLM-4.5 MoE → llama.cpp `glm4moe`: the same tensors, with the four GLM control tokens its converter requires.

In: a GLM-4.5 MoE checkpoint (moegraft's graft of a Llama, Qwen3, Phi-3...). Out: an export-ready copy whose
tokenizer also holds `[gMASK]`, `<|user|>`, `<|endoftext|>`, `<|observation|>` (the converter's GLM vocab reads
their ids for bos/eot/unk/eom and stops without them). Where the model's vocabulary has no unused rows for
them, embeddings and output head grow by zero rows: every real token's logit is unchanged, the added ones are 0.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from moegraft.export.base import GGUFTarget
from moegraft.formats.base import OutTensor
from moegraft.io.writer import TensorSpec

GLM_CONTROL_TOKENS = ("[gMASK]", "<|user|>", "<|endoftext|>", "<|observation|>")
_VOCAB_ROWS = re.compile(r"^(model\.embed_tokens|lm_head)\.weight$")


class Glm4MoeGGUF(GGUFTarget):
    name = "glm4_moe"
    model_types = ("glm4_moe",)

    def __init__(self, source):
        super().__init__(source)
        self._tok = None

    def refusal(self) -> str | None:
        if int(self.config.get("num_nextn_predict_layers") or 0):
            return "multi-token-prediction layers: moegraft writes none, and exports none"
        return None

    def tokenizer(self):
        """The source's tokenizer with GLM's control tokens added (those it lacks), loaded once."""
        if self._tok is None:
            from tokenizers import AddedToken
            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as d:
                self.source.copy_aux(Path(d))
                tok = AutoTokenizer.from_pretrained(d)
            missing = [t for t in GLM_CONTROL_TOKENS if t not in tok.get_added_vocab()]
            tok.add_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
            )
            self._tok, self._added = tok, missing
        return self._tok

    def _pad_rows(self) -> int:
        """Zero rows the vocabulary matrices need so that every tokenizer id has one."""
        return max(0, len(self.tokenizer()) - int(self.config["vocab_size"]))

    def ready_config(self) -> dict:
        c = dict(self.config)
        c["vocab_size"] = int(c["vocab_size"]) + self._pad_rows()
        return c

    def ready_tensors(self) -> list[OutTensor]:
        pad = self._pad_rows()
        out = []
        for name in self.source.tensor_names():
            if pad and _VOCAB_ROWS.match(name):
                out.append(self._padded(name, pad))
            else:
                out.append(self.copy(name))
        if self._added:
            self.changes.append(
                f"added GLM's control tokens {', '.join(self._added)} to the tokenizer (llama.cpp's GLM vocab "
                "needs their ids)"
                + (
                    f"; vocabulary rows {self.config['vocab_size']} -> +{pad} zero rows (their logits are 0)"
                    if pad
                    else ""
                )
            )
        return out

    def _padded(self, name: str, pad: int) -> OutTensor:
        V, H = self.source.shape(name)
        dtype = self.source.dtype(name)

        def make():
            return torch.cat([self.source.get(name), torch.zeros(pad, H, dtype=dtype)])  # (V + pad, H)

        return OutTensor(TensorSpec(name, (V + pad, H), dtype), make)

    def finish_ready(self, out_dir: Path) -> None:
        self.tokenizer().save_pretrained(out_dir)
