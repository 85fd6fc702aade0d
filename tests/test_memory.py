"""Memory levers: the chunked distillation KL equals the plain one (value and gradient), and gradient checkpointing
with frozen embeddings gives the gradients and the training run of the plain forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import TEST_SEED, build, byte_tokenizer, tiny_llama_config
from moegraft.config import GraftSpec
from moegraft.convert import convert
from moegraft.data import read_texts
from moegraft.models import load_causal_lm, parameters_by_pathway
from moegraft.train import TrainSpec, train
from moegraft.train.distill import distill_kl
from moegraft.train.metrics import read_metrics
from tolerance import close


@pytest.mark.tolerance
@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_kl_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(TEST_SEED)
    B, T, V = 2, 7, 11
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64).requires_grad_(True)
    teacher = 3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    # the reference: KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s), averaged over the B·T tokens
    p_t = torch.softmax(teacher, -1)
    ref = (p_t * (torch.log(p_t) - torch.log_softmax(student, -1))).sum(-1).mean()
    (ref_grad,) = torch.autograd.grad(ref, student)
    # chunked (the kernel computes in fp32: compare at fp32 accuracy)
    got = distill_kl(student, teacher, chunk)
    (grad,) = torch.autograd.grad(got, student)
    assert got.dtype == torch.float32
    close(got, ref, rel=1e-5, abs=1e-6, what="chunked KL vs float64 reference")
    close(grad, ref_grad, rel=1e-4, abs=1e-7, what="chunked KL gradient vs float64 reference")
    # and what transformers-style code computes with F.kl_div on the whole tensor
    full = F.kl_div(
        F.log_softmax(student, -1).flatten(0, 1),
        F.log_softmax(teacher, -1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    )
    close(got, full, rel=1e-5, abs=1e-6, what="chunked KL vs F.kl_div")


@pytest.fixture(scope="module")
def graft(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memory")
    dense = build(tiny_llama_config(), root / "dense")
    byte_tokenizer().save_pretrained(dense)
    convert(
        str(dense),
        root / "moe",
        GraftSpec(num_experts=4, top_k=2, expert_size=32, calib_tokens=512),
        progress=False,
    )
    (root / "text.txt").write_text("\n\n".join(read_texts("stdlib:train")[:10]))
    return root


def _grads(model, x) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.tolerance
def test_gradient_checkpointing_with_frozen_embeddings(graft):
    # the trap: reentrant checkpointing gives no gradient when the layer input (the frozen embeddings' output)
    # needs none; non-reentrant checkpointing must give exactly the plain gradients
    model, _ = load_causal_lm(graft / "moe", with_tokenizer=False)
    trainable = set(parameters_by_pathway(model)["router"] + parameters_by_pathway(model)["experts"])
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    model.train()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1 + TEST_SEED))
    plain = _grads(model, x)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_activation_checkpointing
    ckpt = _grads(model, x)
    assert set(plain) == set(ckpt) == trainable
    # (the experts' output path starts at zero, so at step 0 only the experts' down_proj has a gradient)
    assert any(g.abs().sum() > 0 for n, g in ckpt.items() if "down_proj" in n)
    for n in plain:
        close(ckpt[n], plain[n], rel=1e-5, abs=1e-7, what="checkpointed vs plain gradient")


@pytest.mark.tolerance
def test_training_with_checkpointing_matches_plain(graft):
    # grad_accum 2: the second micro-batch's balance loss uses the first one's counts, which the routers' re-run
    # in backward must not double
    def run(name: str, gc: bool):
        spec = TrainSpec(
            data=str(graft / "text.txt"),
            seq_len=32,
            batch=2,
            grad_accum=2,
            steps=2,
            log_every=1,
            eval_blocks=2,
            gradient_checkpointing=gc,
        )
        return read_metrics(
            train(graft / "moe", graft / name, spec, progress=False).run_dir / "metrics.jsonl"
        )

    a, b = run("plain", False), run("ckpt", True)
    for ra, rb in zip(a, b, strict=True):
        for k in ("loss", "aux", "eval_loss", "load_cv"):
            if k in ra:
                close(rb[k], ra[k], rel=1e-5, abs=1e-6, what=f"checkpointed vs plain run, {k}")
