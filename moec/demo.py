"""The built-in demo: a small Mixtral-style causal LM from a config with seeded random weights."""

from __future__ import annotations

import torch

from moec.sources import LoadedSource, causal_lm_source


def mixtral_demo(seed: int = 0) -> LoadedSource:
    """4 layers, 8 experts, top-2, hidden 64: compiles in seconds on a laptop CPU."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    randomize_(model, seed)
    return causal_lm_source(model, "builtin:mixtral-demo")


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Seeded random weights everywhere (parameters and float buffers such as selection biases).

    transformers initializes some routers to zero, which makes every score tie; random
    routers keep top-k selection well defined (see docs/DESIGN.md, "Routing ties").
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "rotary" in name or "inv_freq" in name:
                continue
            # in place: no temporary the size of the parameter
            if t.dim() >= 2:
                t.normal_(0.0, std, generator=gen)
            elif "norm" in name:
                t.normal_(1.0, 0.1, generator=gen)
            else:
                t.normal_(0.0, 0.1, generator=gen)


def shape_spectrum_(model: torch.nn.Module, alpha: float) -> None:
    """Give every weight matrix singular values falling as i^-alpha (same Frobenius norm, same singular vectors).

    Seeded Gaussian matrices have flat spectra, so the hidden states they produce are nearly isotropic; trained
    matrices do not (their spectra are heavy-tailed, and their hidden states correlated). alpha 0 leaves the
    model as it is; alpha 0.5-1 makes a few directions dominate every layer's inputs, which is what calibrated
    quantization (GPTQ) feeds on. Stacked experts ([E, N, K]) are shaped one matrix at a time.
    """
    if alpha < 0:
        raise ValueError(f"spectrum exponent must be >= 0, got {alpha}")
    if alpha == 0:
        return
    with torch.no_grad():
        for _, t in model.named_parameters():
            if t.dim() < 2 or not t.is_floating_point():
                continue
            for m in t.view(-1, *t.shape[-2:]):
                u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
                power = torch.arange(1, s.numel() + 1, dtype=torch.float64) ** -alpha
                m.copy_((u * (power * (s.norm() / power.norm()))) @ vh)
