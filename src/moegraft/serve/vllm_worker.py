"""Run by the vLLM venv's own python (not moegraft's): greedy continuations and their logprobs from vLLM.

In: a JSON request file {"models": [{"model": DIR, "prompts": [[ids]], "tokens": N}], "engine": {LLM kwargs}}.
Out: a JSON file {"results": [{"model": DIR, "tokens": [[ids]], "logprobs": [[float]]} or {"error": line}]}.
Only the standard library and vllm: this file must import in a venv that has no moegraft and no shared torch.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import traceback

# run by path, this file's folder is sys.path[0]: its siblings (moegraft.serve's modules) must not shadow packages
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

# the engine runs in this process: no spawned engine core to start (slow on few cores) or to leave behind when
# one model fails and the next one starts
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def error_line(e: BaseException) -> str:
    """The exception's own message in one line (the deepest cause: vLLM wraps its engine's errors; pydantic's
    last lines are a link and a type tag, dropped)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [x.strip() for x in str(e).splitlines() if x.strip() and not x.strip().startswith("For further")]
    last = re.sub(r" \[type=.*$", "", lines[-1]) if lines else ""
    return f"{type(e).__name__}: {last}"


def run_model(job: dict, engine: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], tokenizer=job["model"], **engine)
    try:
        # greedy, EOS ignored (transformers' reference runs N steps too); logprobs=1 returns the chosen
        # token's logprob (vLLM's raw log-softmax of the model's logits) among the top-1
        params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True, logprobs=1)
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False
        )
        tokens, logprobs = [], []
        for o in outs:
            c = o.outputs[0]
            tokens.append(list(c.token_ids))
            logprobs.append([float(lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs, strict=True)])
        return {"model": job["model"], "tokens": tokens, "logprobs": logprobs}
    finally:
        del llm
        gc.collect()


def main(request_path: str, result_path: str) -> None:
    with open(request_path) as f:
        request = json.load(f)
    results = []
    for job in request["models"]:
        try:
            results.append(run_model(job, request["engine"]))
        except Exception as e:  # one model's failure is its result (the exact error), not the whole run's
            traceback.print_exc()
            results.append({"model": job["model"], "error": error_line(e)})
        # write after every model, so a crash later keeps what was measured
        with open(result_path, "w") as f:
            json.dump({"results": results}, f)


if __name__ == "__main__":  # vLLM may spawn helpers that re-import this file: the guard keeps them idle
    main(sys.argv[1], sys.argv[2])
