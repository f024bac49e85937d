"""Greedy generation through a KV-cache decoder, the same loop over eager PyTorch, ONNX Runtime and
onnxruntime-genai: the generation golden of a text-generation artifact, and its check.

The loop is transformers': the prompts left-padded into one batch (mask 0 on padding), positions counting
the unpadded tokens, one prefill step, then one token a step with the cache fed back. It runs a fixed
number of steps (no stop at end-of-sequence) so that every step's logits can be compared;
`first_divergence` names the first step whose token differs. onnxruntime-genai runs its own loop, which
takes a batch padded on the right (`genai_generate`); its tokens are compared with the same golden.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from moec.errors import GoldenError, MoecError

Step = Callable[[dict[str, np.ndarray]], list[np.ndarray]]  # feeds -> [logits, present k/v per layer...]

GOLDEN_FILE = "generation.json"
LOGITS_FILE = "generation.logits.npy"


@dataclass
class GreedyRun:
    """Prompts (ragged), the new tokens [batch, steps] and every step's last-position logits
    [batch, steps, vocab] (float32)."""

    prompts: list[list[int]]
    tokens: np.ndarray
    logits: np.ndarray


@dataclass
class Divergence:
    batch: int  # which prompt set
    row: int
    step: int
    expected: int
    got: int
    rel_l2: Optional[float]  # of that step's logits (None: the runner gives tokens only)

    def describe(self) -> str:
        logits = ("the runner gives no logits to compare" if self.rel_l2 is None else
                  f"that step's logits differ by relative L2 {self.rel_l2:.3g}")
        return (f"prompt set {self.batch}, row {self.row}: the first diverging token is at step {self.step} "
                f"(expected {self.expected}, got {self.got}); {logits}")


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each [batch, longest], prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
    return ids, mask


def greedy(step: Step, prompts: Sequence[Sequence[int]], new_tokens: int, cache_shapes: Sequence[tuple[int, int]],
           pad_id: int = 0, max_positions: Optional[int] = None) -> GreedyRun:
    """Run `new_tokens` greedy steps. `cache_shapes`: (kv_heads, head_dim) of every past input, in input
    order (key, value per layer)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MoecError("every prompt needs at least one token.")
    longest = max(len(p) for p in prompts)
    if max_positions is not None and longest + new_tokens > max_positions:
        raise MoecError(f"a prompt of {longest} tokens and {new_tokens} new tokens need {longest + new_tokens} "
                        f"positions; the model has {max_positions} (max_position_embeddings).")
    ids, mask = left_pad(prompts, pad_id)
    batch = ids.shape[0]
    past = [np.zeros((batch, heads, 0, dim), np.float32) for heads, dim in cache_shapes]
    tokens, logits = [], []
    for _ in range(new_tokens):
        positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)[:, mask.shape[1] - ids.shape[1]:]
        out = step({"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions),
                    **{n: p for n, p in zip(past_names(len(past)), past)}})
        last = np.asarray(out[0][:, -1, :], dtype=np.float32)
        nxt = last.argmax(-1).astype(np.int64)
        tokens.append(nxt)
        logits.append(last)
        past = [np.asarray(p) for p in out[1:]]
        ids = nxt[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return GreedyRun([list(map(int, p)) for p in prompts], np.stack(tokens, 1), np.stack(logits, 1))


def past_names(n: int) -> list[str]:
    return [f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}" for i in range(n)]


def torch_step(module) -> Step:
    """A CausalLMDecoder (or anything taking the decoder's flat inputs) as a Step."""
    import torch

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds["input_ids"])),
                torch.from_numpy(np.ascontiguousarray(feeds["attention_mask"])),
                torch.from_numpy(np.ascontiguousarray(feeds["position_ids"]))]
        args += [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in past_names(len(feeds) - 3)]
        with torch.no_grad():
            return [o.detach().float().numpy() for o in module(*args)]

    return run


def session_step(runner) -> Step:
    """An OrtRunner (moec.verify) as a Step; its outputs in the artifact's order."""
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = runner.run(feeds)
        return [out[n] for n in runner.outputs]

    return run


def prompt_sets(vocab: int, pad_id: int, seed: int = 0) -> list[list[list[int]]]:
    """Fixed verification prompts (no pad id in them): one prompt alone, and three of different lengths
    batched with left padding."""
    rng = np.random.default_rng(seed)
    ids = [t for t in range(vocab) if t != pad_id]

    def prompt(n: int) -> list[int]:
        return [int(ids[i]) for i in rng.integers(0, len(ids), size=n)]

    return [[prompt(6)], [prompt(5), prompt(2), prompt(7)]]


def first_divergence(batch: int, expected: GreedyRun, got: GreedyRun) -> Optional[Divergence]:
    for step in range(expected.tokens.shape[1]):
        for row in range(expected.tokens.shape[0]):
            if expected.tokens[row, step] != got.tokens[row, step]:
                return Divergence(batch, row, step, int(expected.tokens[row, step]), int(got.tokens[row, step]),
                                  rel_l2(expected.logits[row, step], got.logits[row, step]))
    return None


def token_agreement(a: list[GreedyRun], b: list[GreedyRun]) -> float:
    """The fraction of greedy tokens two sets of runs share, position by position."""
    same = sum(int((x.tokens == y.tokens).sum()) for x, y in zip(a, b))
    return same / max(sum(x.tokens.size for x in a), 1)


def rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


@dataclass
class GenerationCheck:
    """The comparison of one runner's greedy runs with the golden ones."""

    runner: str
    divergence: Optional[Divergence]
    worst_logits_rel_l2: float  # over every step of every row, up to the first divergence
    tolerance: float
    steps: int
    compares_logits: bool = True  # onnxruntime-genai's check compares tokens only
    how: str = ""  # how a tokens-only runner was given the prompts

    @property
    def passed(self) -> bool:
        return self.divergence is None and self.worst_logits_rel_l2 <= self.tolerance

    def describe(self) -> str:
        if self.divergence is not None:
            return f"{self.runner}: {self.divergence.describe()}"
        if not self.compares_logits:
            return f"{self.runner}: every token equal over {self.steps} steps (tokens only, {self.how})"
        verdict = "within" if self.passed else "over"
        return (f"{self.runner}: every token equal over {self.steps} steps; logits worst relative L2 "
                f"{self.worst_logits_rel_l2:.3g} ({verdict} tolerance {self.tolerance:g})")

    def to_dict(self) -> dict:
        return {"runner": self.runner, "passed": self.passed, "steps": self.steps, "logits": self.compares_logits,
                "worst_logits_rel_l2": self.worst_logits_rel_l2, "tolerance": self.tolerance, "how": self.how or None,
                "divergence": None if self.divergence is None else self.divergence.__dict__}


def check(runner: str, expected: list[GreedyRun], got: list[GreedyRun], tolerance: float) -> GenerationCheck:
    worst, first = 0.0, None
    for b, (e, g) in enumerate(zip(expected, got)):
        d = first_divergence(b, e, g)
        upto = e.tokens.shape[1] if d is None else d.step + 1
        for row in range(e.tokens.shape[0]):
            for step in range(upto):
                worst = max(worst, rel_l2(e.logits[row, step], g.logits[row, step]))
        first = first or d
    return GenerationCheck(runner, first, worst, tolerance, int(expected[0].tokens.shape[1]))


# ----------------------------------------------------------------------------- the golden


@dataclass
class GenerationGolden:
    runs: list[GreedyRun]
    new_tokens: int
    pad_id: int
    cache_shapes: list[tuple[int, int]]
    max_positions: int
    tolerance: float
    reference: str  # what produced it: "eager PyTorch", "the dequantized reference" ...
    eos_ids: list[int]


def write_generation_golden(golden_dir: str, g: GenerationGolden) -> None:
    """generation.json (prompts, tokens, settings) and generation.logits.npy [sets, max rows, steps, vocab]."""
    rows = max(r.tokens.shape[0] for r in g.runs)
    vocab = g.runs[0].logits.shape[-1]
    logits = np.zeros((len(g.runs), rows, g.new_tokens, vocab), np.float32)
    for i, r in enumerate(g.runs):
        logits[i, :r.tokens.shape[0]] = r.logits
    np.save(os.path.join(golden_dir, LOGITS_FILE), logits)
    meta = {"format": "moec-generation/1", "new_tokens": g.new_tokens, "pad_id": g.pad_id,
            "cache_shapes": [list(s) for s in g.cache_shapes], "max_positions": g.max_positions,
            "tolerance_rel_l2": g.tolerance, "reference": g.reference, "eos_token_ids": g.eos_ids,
            "prompt_sets": [{"prompts": r.prompts, "tokens": r.tokens.tolist()} for r in g.runs]}
    with open(os.path.join(golden_dir, GOLDEN_FILE), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")


def load_generation_golden(golden_dir: str) -> Optional[GenerationGolden]:
    """None when the golden has no generation part (an artifact that is not a decoder)."""
    path = os.path.join(golden_dir, GOLDEN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
        logits = np.load(os.path.join(golden_dir, LOGITS_FILE))
        runs = []
        for i, s in enumerate(meta["prompt_sets"]):
            tokens = np.asarray(s["tokens"], np.int64)
            runs.append(GreedyRun(s["prompts"], tokens, logits[i, :tokens.shape[0], :tokens.shape[1]]))
        return GenerationGolden(runs, int(meta["new_tokens"]), int(meta["pad_id"]),
                                [tuple(x) for x in meta["cache_shapes"]], int(meta["max_positions"]),
                                float(meta["tolerance_rel_l2"]), str(meta["reference"]),
                                [int(e) for e in meta.get("eos_token_ids", [])])
    except Exception as exc:
        raise GoldenError(f"the generation golden in '{golden_dir}' is unreadable ({GOLDEN_FILE}, {LOGITS_FILE}): "
                          f"{type(exc).__name__}: {exc}") from exc


def replay(g: GenerationGolden, step: Step) -> list[GreedyRun]:
    return [greedy(step, r.prompts, g.new_tokens, g.cache_shapes, g.pad_id, g.max_positions) for r in g.runs]


# ----------------------------------------------------------------------------- onnxruntime-genai


def genai_available() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except Exception:
        return False
    return True


def right_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> np.ndarray:
    """input_ids [batch, longest], prompts left-aligned and padded on the right with `pad_id`."""
    ids = np.full((len(prompts), max(len(p) for p in prompts)), pad_id, dtype=np.int64)
    for r, p in enumerate(prompts):
        ids[r, :len(p)] = p
    return ids


def genai_generate(artifact_dir: str, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
    """onnxruntime-genai's Generator over the artifact directory (its genai_config.json): the new tokens of
    each prompt, greedy, stopping where genai stops (end-of-sequence or `new_tokens`).

    Prompts of different lengths go in as one batch padded on the RIGHT with the pad id, as genai's own
    `Tokenizer.encode_batch` pads: genai 0.18 masks only the pad tokens that end a row (and counts positions
    over the rest), so a left-padded batch would be run with its pads as real tokens (measured: its own
    builder's models diverge on such rows exactly as moec's do). The graph still sees transformers'
    semantics: the mask genai builds is 0 on the trailing pads, and each row continues from its last real
    token. A prompt ending in the pad id is therefore ambiguous to genai, and refused."""
    with open(os.path.join(artifact_dir, "genai_config.json")) as f:
        pad = json.load(f)["model"]["pad_token_id"]
    for r, p in enumerate(prompts):
        if not len(p) or int(p[-1]) == pad:
            raise MoecError(f"prompt {r} {'is empty' if not len(p) else f'ends in the pad id {pad}'}: "
                            "onnxruntime-genai would take its end for padding.")
    import onnxruntime_genai as og

    model = og.Model(og.Config(artifact_dir))
    ids = right_pad(prompts, pad)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new_tokens, do_sample=False, batch_size=len(prompts))
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [list(map(int, gen.get_sequence(r)))[ids.shape[1]:] for r in range(len(prompts))]


def genai_comparable(tokens: Sequence[int], eos_ids: Sequence[int], pad_id: int) -> list[int]:
    """The prefix of a fixed-length greedy run that onnxruntime-genai surely reproduces: it stops at an
    end-of-sequence token and leaves it out of its sequences; a generated pad token stays in when the
    model has an end-of-sequence id but ends the run when it has none (measured with 0.18). Comparison
    ends before the first of either (pass pad_id=-1 where the model is known to have one)."""
    out = []
    for t in map(int, tokens):
        if t == pad_id or t in eos_ids:
            break
        out.append(t)
    return out


def check_generate(runner: str, g: GenerationGolden,
                   generate: Callable[[list[list[int]], int], list[list[int]]], how: str) -> GenerationCheck:
    """Tokens from `generate(prompts, max_tokens)` (onnxruntime-genai, or a server running it; one list of new
    tokens a prompt) against the golden's, over the prefix genai reproduces (before the first end-of-sequence
    or pad token; the golden runs on). `how`: how the runner was given the prompts, for the report."""
    first = None
    for b, run in enumerate(g.runs):
        got = generate([list(p) for p in run.prompts], g.new_tokens)
        for row in range(len(run.prompts)):
            toks = got[row]
            for step, expected in enumerate(genai_comparable(run.tokens[row], g.eos_ids, g.pad_id)):
                token = toks[step] if step < len(toks) else -1
                if token != expected:
                    first = first or Divergence(b, row, step, expected, token, None)
                    break
    return GenerationCheck(runner, first, 0.0, g.tolerance, g.new_tokens, compares_logits=False, how=how)


def check_genai(artifact_dir: str, g: GenerationGolden) -> GenerationCheck:
    """onnxruntime-genai's Generator over the artifact directory, each prompt set as one batch (padded on the
    right, as genai takes a batch: `genai_generate`). genai gives no per-step logits here: tokens only."""
    return check_generate("onnxruntime-genai", g, lambda prompts, n: genai_generate(artifact_dir, prompts, n),
                          "each prompt set as one batch")
