"""llama.cpp's converter driven through its own Python API with hparams moegraft hands it (no copy, no patch).

In: a JSON job (converter directory, export-ready HF directory, GGUF path, outtype, hparams). Out: the GGUF,
written by the converter's model class exactly as `convert_hf_to_gguf.py` would, except that the class reads
the given hparams instead of `AutoConfig.from_pretrained(dir).to_dict()` (its `hparams=` argument). Run as a
subprocess, in the converter's directory, as run_converter runs the script.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def main(job: dict) -> None:
    script_dir = Path(job["script_dir"])
    # what convert_hf_to_gguf.py does before importing: its own gguf-py first, then its `conversion` package
    sys.path.insert(0, str(script_dir))
    sys.path.insert(1, str(script_dir / "gguf-py"))
    import gguf
    import torch
    from conversion import ModelType, get_model_architecture, get_model_class

    logging.basicConfig(level=logging.INFO)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[job["outtype"]]
    hparams = job["hparams"]
    with torch.inference_mode():
        arch = get_model_architecture(hparams, ModelType.TEXT)
        model_class = get_model_class(arch, mmproj=False)
        if job.get("no_mtp"):
            model_class.no_mtp = True  # what the script's --no-mtp sets
        model = model_class(Path(job["model_dir"]), ftype, Path(job["outfile"]), hparams=hparams)
        model.write()


if __name__ == "__main__":
    main(json.loads(Path(sys.argv[1]).read_text()))
