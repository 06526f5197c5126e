"""llm_sampler benchmark: batched multiple choice, and the per-step cost of our generation loop.

Prints, measured side by side in one run on a tiny random Llama (no download):
  1. multiple-choice scoring of N = 4 and 16 options per question, all options in one batched
     forward vs one option at a time (ratio);
  2. greedy generation: per-step time of a bare hand-written KV-cache loop, of llm_sampler's
     ``generate(HFCausalLM(model), cached=True)`` and of ``model.generate(do_sample=False)``;
     the overhead of each loop over the bare one, and the ratios; and llm_sampler's loop alone
     around a forward function that costs nothing.

Runs are interleaved and the best round is kept, with one torch thread by default, because the
machine may be shared. Run: ``bash dev.sh bench sampler`` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import transformers

import llm_sampler as S


def tiny_llama(vocab: int = 512) -> transformers.LlamaForCausalLM:
    """A small random Llama built from a config object: nothing is downloaded."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def timed_side_by_side(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds of each run over ``repeats`` rounds; the runs are interleaved so that load
    from other processes hits them alike, and the minimum drops the rounds it did hit."""
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):
        shift = round_ % len(names)  # rotate the order so no run always goes first
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def bench_multiple_choice(model, questions: int, repeats: int) -> None:
    """Print batched vs one-option-at-a-time multiple choice for N = 4 and 16."""
    forward = S.HFCausalLM(model, cached=False)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (24,), generator=gen).tolist() for _ in range(questions)]
    print(f"multiple choice: {questions} questions, 24-token prompts, 1-6 token options")
    print(f"  {'N':>3} {'batched (ms)':>13} {'one at a time (ms)':>19} {'speed-up':>9}")
    for n in (4, 16):
        options = [
            [torch.randint(3, 512, (1 + (q + k) % 6,), generator=gen).tolist() for k in range(n)]
            for q in range(questions)
        ]
        batched = S.multiple_choice(forward, prompts, options)
        single = S.multiple_choice(forward, prompts, options, batch_size=1)
        if not torch.equal(batched.best, single.best):
            raise SystemExit("batched and one-at-a-time multiple choice disagree")
        times = timed_side_by_side(
            {
                "batched": lambda o=options: S.multiple_choice(forward, prompts, o),
                "one": lambda o=options: S.multiple_choice(forward, prompts, o, batch_size=1),
            },
            repeats,
        )
        t_batch, t_one = times["batched"], times["one"]
        print(f"  {n:>3} {t_batch * 1e3:>13.1f} {t_one * 1e3:>19.1f} {t_one / t_batch:>8.1f}x")
    print("  (best of interleaved runs)")


def bare_loop(model, ids: torch.Tensor, steps: int) -> list[int]:
    """The least a greedy KV-cache loop can do: model call, argmax, feed back."""
    out, past, x = [], None, ids
    with torch.no_grad():
        for _ in range(steps):
            result = model(input_ids=x, past_key_values=past, use_cache=True)
            past = result.past_key_values
            x = result.logits[:, -1:].argmax(-1)
            out.append(int(x))
    return out


def loop_without_model(steps: int, repeats: int) -> float:
    """Seconds per step of llm_sampler's loop around a forward function that costs nothing."""
    logits = torch.zeros(1, 1, 512)
    logits[0, 0, 7] = 1.0

    def free_forward(ids: torch.Tensor) -> torch.Tensor:
        return logits.expand(ids.shape[0], ids.shape[1], -1)

    def run() -> object:
        return S.generate(free_forward, [1, 2, 3], max_new_tokens=steps, cached=True)

    return timed_side_by_side({"loop": run}, repeats)["loop"] / steps


def bench_generation(model, steps: int, repeats: int) -> None:
    """Print per-step times of the bare loop, llm_sampler and transformers' generate."""
    prompt = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(2))

    def ours():
        return S.generate(S.HFCausalLM(model), prompt, max_new_tokens=steps, cached=True)[0]

    def theirs():
        with torch.no_grad():
            out = model.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                max_new_tokens=steps, min_new_tokens=steps,
            )  # fmt: skip
        return out[0, prompt.shape[1] :].tolist()

    if not ours() == theirs() == bare_loop(model, prompt, steps):
        raise SystemExit("greedy tokens differ between the loops")
    times = timed_side_by_side(
        {"bare": lambda: bare_loop(model, prompt, steps), "ours": ours, "hf": theirs}, repeats
    )
    bare, t_ours, t_hf = (times[name] / steps for name in ("bare", "ours", "hf"))
    loop_only = loop_without_model(steps, repeats)
    print(f"greedy generation: batch 1, 8-token prompt, {steps} new tokens, KV cache")
    print(f"  {'loop':<28} {'ms/step':>8} {'overhead ms/step':>17}")
    print(f"  {'bare model calls':<28} {bare * 1e3:>8.3f} {0.0:>17.3f}")
    print(f"  {'llm_sampler generate':<28} {t_ours * 1e3:>8.3f} {(t_ours - bare) * 1e3:>17.3f}")
    print(f"  {'transformers generate':<28} {t_hf * 1e3:>8.3f} {(t_hf - bare) * 1e3:>17.3f}")
    print(f"  {'llm_sampler, free forward':<28} {loop_only * 1e3:>8.3f} {loop_only * 1e3:>17.3f}")
    print(f"  per-step time, transformers / llm_sampler: {t_hf / t_ours:.2f}x")
    over_ours, over_hf = t_ours - bare, t_hf - bare
    if over_ours > 0:
        print(f"  loop overhead, transformers / llm_sampler: {over_hf / over_ours:.2f}x")
    else:
        print("  loop overhead of llm_sampler is below timing noise")


def main() -> None:
    """Parse the options and print both benchmarks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--steps", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = tiny_llama()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    bench_multiple_choice(model, args.questions, args.repeats)
    bench_generation(model, args.steps, args.repeats)


if __name__ == "__main__":
    main()
