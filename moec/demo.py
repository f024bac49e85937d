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
