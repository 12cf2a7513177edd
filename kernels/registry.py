"""The kernel library's fusion patterns: what each matches, and how it lowers.

`default_registry()` returns a fresh Registry holding them. Each pattern also has an
example graph builder (`kernels.examples`), which the test suite uses to check the
fused kernel against the unfused reference for every registered pattern.
"""
from __future__ import annotations

import hashlib

from fusec.fusion.dtypes import DType
from fusec.fusion.ir import Node
from fusec.fusion.patterns import Match, Pattern, PNode, Registry
from fusec.fusion.plan import Arg, Launch, LowerContext
from fusec.kernels.attention import PagedAttention, heads_per_block
from fusec.kernels.base import cdiv
from fusec.kernels.elementwise import Add, AddRmsNorm, BiasAdd, Embed, GatherRows, SiluMul, Unary
from fusec.kernels.gemv import Gemv, vector_width
from fusec.kernels.quant import takes_int8_dots
from fusec.kernels.rope_kv import RopeKVWrite, cos_sin_table


def V(name: str) -> Arg:
    return Arg("value", name)


def D(name: str) -> Arg:
    return Arg("dim", name)


def _dtype(match: Match, name: str) -> DType:
    return match.graph.node(name).type.dtype


def _rows(node: Node) -> str:
    dim = node.type.shape[0]
    assert isinstance(dim, str), f"{node.name}: rows must be a symbolic dim"
    return dim


# -- GEMV family -------------------------------------------------------------------------
def _gemv_parts(m: Match) -> tuple[Node, Node]:
    mm = m["matmul"]
    return mm, m.get("bias") or mm


def gemv_constraint(m: Match) -> bool:
    """The kernel has one weight dtype (matrix, norm weight, bias), one activation dtype
    (its inputs and the values its prologue makes) and one output dtype."""
    mm, out = _gemv_parts(m)
    weights = [mm.inputs[1]] + [m[r].inputs[1] for r in ("norm", "bias", "post") if m.get(r) is not None]
    if m.get("norm") is not None and m["norm"].kind == "layer_norm":
        weights.append(m["norm"].inputs[2])
    if m.get("post") is not None and m["post"].attrs["eps"] != m["norm"].attrs["eps"]:
        return False  # the kernel has one eps
    if len({_dtype(m, w) for w in weights}) != 1 or out.type.dtype != mm.type.dtype:
        return False
    acts = {_dtype(m, a) for a in m["add"].inputs} | {m["add"].type.dtype} if m.get("add") else set()
    for role in ("norm", "act", "gather", "post"):
        node = m.get(role)
        if node is not None:
            acts |= {node.type.dtype, _dtype(m, node.inputs[0])}
    if not any(m.get(r) for r in ("add", "norm", "act", "gather")):
        acts.add(_dtype(m, mm.inputs[0]))
    return len(acts) == 1


def ungrouped_gemv_constraint(m: Match) -> bool:
    """A gated prologue reads one [gate | up] per row: a grouped activation (a MoE
    block's slots) is the MoE GEMVs' (kernels/moe.py)."""
    return m["act"].attrs.get("groups", 1) == 1 and gemv_constraint(m)


# A host thread keeps a tile's prologue rows across the blocks it runs, so a block's size
# only sets how evenly threads share a GEMV: 16 rows (SmolLM2 q4_1, 2 cores, N = 1 / 8 / 32:
# 191 / 563 / 620 tok/s; 32 rows 176 / 522 / 569; 64 rows 192 / 528 / 564; 8 rows
# 191 / 543 / 633; run-to-run spread about 8%)
HOST_ROWS_PER_BLOCK = 16
# token rows a host GEMV block takes together; measured on SmolLM2 q4_1 (2-core EPYC),
# tok/s at N = 1 / 8 / 32: 4 rows 170 / 338 / 415, 8 rows 175 / 457 / 534, 16 rows
# 160 / 403 / 397 (16 x 1 accumulators and 16 x rows' activations no longer fit registers)
HOST_TOKENS_PER_BLOCK = 8


def lower_gemv(m: Match, ctx: LowerContext) -> Launch:
    mm, out = _gemv_parts(m)
    add, norm, gather, act, bias, post = (m.get(r) for r in ("add", "norm", "gather", "act", "bias", "post"))
    args = {"w": V(mm.inputs[1]), "y": V(out.name), "num_rows": D(_rows(out))}
    outputs = [out.name]
    residual_out = add is not None and m.escapes("add")
    if post is not None:  # sandwich norms: the add's operand 1 is the normed block output
        prologue, first = "rms_norm_add_rms_norm", add
        args |= {"a": V(add.inputs[0]), "b": V(post.inputs[0]), "post_w": V(post.inputs[1]),
                 "norm_w": V(norm.inputs[1])}
        if residual_out:
            args["residual"] = V(add.name)
            outputs.append(add.name)
    elif add is not None:
        prologue, first = f"add_{norm.kind}", add
        args |= {"a": V(add.inputs[0]), "b": V(add.inputs[1]), "norm_w": V(norm.inputs[1])}
        if residual_out:
            args["residual"] = V(add.name)
            outputs.append(add.name)
    elif norm is not None:
        prologue, first = norm.kind, norm
        args |= {"x": V(norm.inputs[0]), "norm_w": V(norm.inputs[1])}
    elif act is not None:  # an MLP's activation: the op kind names the prologue
        prologue, first = act.kind, act
        args["x" if act.kind == "gelu" else "gu"] = V(act.inputs[0])
    else:
        prologue, first = "none", mm
        args["x"] = V(mm.inputs[0])
    if norm is not None and norm.kind == "layer_norm":
        args["norm_b"] = V(norm.inputs[2])
    if gather is not None:
        args["rows"] = V(gather.inputs[1])
    if bias is not None:
        args["bias"] = V(bias.inputs[1])
    k = m.graph.node(mm.inputs[1]).type.shape[1]
    act, weight = _dtype(m, first.inputs[0]), _dtype(m, mm.inputs[1])
    n = mm.type.shape[1]
    # output blocks go on grid y (at most 65535): very wide outputs take more rows a block.
    rows = max(4, cdiv(n, 65535)) if ctx.target.is_gpu else HOST_ROWS_PER_BLOCK
    kernel = Gemv(k=k, n=n, act=act, weight=weight,
                  out=out.type.dtype, prologue=prologue, bias=bias is not None, gather=gather is not None,
                  residual_out=residual_out, eps=norm.attrs["eps"] if norm is not None else 0.0,
                  rows_per_block=rows, weight_format=m.graph.node(mm.inputs[1]).format,
                  tokens_per_block=1 if ctx.target.is_gpu else HOST_TOKENS_PER_BLOCK,
                  vec=vector_width(k, act, weight) if ctx.gpu_shapes else 1,
                  int8_dots=takes_int8_dots(m.graph.node(mm.inputs[1]).format, ctx.int8_activations))
    return ctx.kernel_launch(m, kernel, args, tuple(outputs), {"num_rows": _rows(out)})


ADD = PNode("add", "add")
NORM_AFTER_ADD = PNode("norm", "rms_norm", (("add", 0),))
POST = PNode("post", "rms_norm")  # a block's output norm (Gemma 2), added to the residual
ADD_POST = PNode("add", "add", (("post", 1),))
NORM = PNode("norm", "rms_norm")


def _mm(src: str | None) -> PNode:
    return PNode("matmul", "matmul", ((src, 0),) if src else ())


BIAS = PNode("bias", "bias_add", (("matmul", 0),))
GATHER = PNode("gather", "gather_rows", (("norm", 0),))
MM_AFTER_GATHER = PNode("matmul", "matmul", (("gather", 0),))


def gemv_patterns() -> list[Pattern]:
    specs = [
        ("add_rms_norm_gemv_bias", 60, (ADD, NORM_AFTER_ADD, _mm("norm"), BIAS), {"add"}, gemv_constraint,
         "residual add + RMSNorm + GEMV + bias (Qwen2's QKV)"),
        ("add_rms_norm_gather_gemv", 58, (ADD, NORM_AFTER_ADD, GATHER, MM_AFTER_GATHER), set(), gemv_constraint,
         "last residual add + final norm on the rows that need logits + LM head (the sum stays private)"),
        ("add_rms_norm_gemv", 55, (ADD, NORM_AFTER_ADD, _mm("norm")), {"add"}, gemv_constraint,
         "residual add + RMSNorm + GEMV (QKV, gate|up)"),
        ("rms_norm_add_rms_norm_gemv", 62, (POST, ADD_POST, NORM_AFTER_ADD, _mm("norm")), {"add"}, gemv_constraint,
         "output RMSNorm + residual add + RMSNorm + GEMV (Gemma 2's sandwich norms around QKV, gate|up)"),
        ("rms_norm_add_rms_norm_gather_gemv", 61, (POST, ADD_POST, NORM_AFTER_ADD, GATHER, MM_AFTER_GATHER), set(),
         gemv_constraint, "the last block's output norm + residual add + final norm on the rows that need logits "
                          "+ LM head (Gemma 2)"),
        ("rms_norm_gemv_bias", 50, (NORM, _mm("norm"), BIAS), set(), gemv_constraint,
         "RMSNorm + GEMV + bias (first layer's QKV with bias)"),
        ("rms_norm_gather_gemv", 48, (NORM, GATHER, MM_AFTER_GATHER), set(), gemv_constraint,
         "final norm on the rows that need logits + LM head"),
        ("rms_norm_gemv", 45, (NORM, _mm("norm")), set(), gemv_constraint, "RMSNorm + GEMV (first layer's QKV)"),
        ("silu_mul_gemv", 40, (PNode("act", "silu_mul"), _mm("act")), set(), ungrouped_gemv_constraint,
         "SiLU(gate) * up + down-projection GEMV"),
        ("gelu_tanh_mul_gemv", 40, (PNode("act", "gelu_tanh_mul"), _mm("act")), set(), ungrouped_gemv_constraint,
         "GELU-tanh(gate) * up + down-projection GEMV (Gemma's GeGLU)"),
        ("gelu_gemv_bias", 42, (PNode("act", "gelu"), _mm("act"), BIAS), set(), gemv_constraint,
         "GELU + down-projection GEMV + bias (GPT-NeoX)"),
        ("gelu_gemv", 40, (PNode("act", "gelu"), _mm("act")), set(), gemv_constraint, "GELU + GEMV"),
        ("gemv_bias", 30, (_mm(None), BIAS), set(), gemv_constraint, "GEMV + bias"),
        ("gemv", 20, (_mm(None),), set(), gemv_constraint, "plain GEMV (O-projection)"),
    ]
    # each plain-norm prologue again with a LayerNorm (StableLM): the same kernels, a bias more
    specs += [(name.replace("rms_norm", "layer_norm"), prio, tuple(_as_layer_norm(n) for n in nodes), esc, c,
               doc.replace("RMSNorm", "LayerNorm") + " (LayerNorm)")
              for name, prio, nodes, esc, c, doc in specs
              if any(n.role == "norm" for n in nodes) and not any(n.role == "post" for n in nodes)]
    return [Pattern(name, prio, nodes, lower_gemv, buckets=("gemv",), escapes=frozenset(esc), constraint=c, doc=doc)
            for name, prio, nodes, esc, c, doc in specs]


def _as_layer_norm(node: PNode) -> PNode:
    return PNode(node.role, "layer_norm", node.inputs) if node.role == "norm" else node


# -- RoPE + KV write ------------------------------------------------------------------
def rope_kv_constraint(m: Match) -> bool:
    sq, sk, sv, rq, rk = (m[r] for r in ("q", "k", "v", "q_rope", "k_rope"))
    ok = (sq.inputs[0] == sk.inputs[0] == sv.inputs[0] and rq.inputs[1] == rk.inputs[1]
          and rq.attrs["inv_freq"] == rk.attrs["inv_freq"] and rq.attrs["head_dim"] == rk.attrs["head_dim"]
          and rq.attrs.get("scale", 1.0) == rk.attrs.get("scale", 1.0)
          and rq.attrs.get("interleaved", False) == rk.attrs.get("interleaved", False)
          and sk.attrs["stop"] - sk.attrs["start"] == sv.attrs["stop"] - sv.attrs["start"]
          and len({rq.type.dtype, rk.type.dtype, sv.type.dtype}) == 1)  # the cache's may differ
    if m.get("q_norm") is None:
        return ok
    nq, nk = m["q_norm"], m["k_norm"]
    return (ok and nq.attrs["eps"] == nk.attrs["eps"] and nq.attrs["head_dim"] == nk.attrs["head_dim"]
            == rq.attrs["head_dim"] and nq.type.dtype == nk.type.dtype == rq.type.dtype
            and _dtype(m, nq.inputs[1]) == _dtype(m, nk.inputs[1]))


def _cache_dtype(cache: DType, act: DType) -> DType | None:
    """A kernel's `cache` field: None where the KV cache is in the activation dtype."""
    return None if cache is act else cache


def lower_rope_kv(m: Match, ctx: LowerContext) -> Launch:
    sq, sk, sv, rq, rk, kvw = (m[r] for r in ("q", "k", "v", "q_rope", "k_rope", "kv_write"))
    inv_freq, scale = rq.attrs["inv_freq"], rq.attrs.get("scale", 1.0)
    table = f"cos_sin_{hashlib.sha256(repr((inv_freq, scale, ctx.max_positions)).encode()).hexdigest()[:12]}"
    if table not in ctx.constants:
        ctx.constants[table] = cos_sin_table(inv_freq, ctx.max_positions, scale)
    qkv = sq.inputs[0]
    nq, nk = m.get("q_norm"), m.get("k_norm")
    norm = {} if nq is None else dict(qk_norm=True, norm_eps=nq.attrs["eps"], norm_weight=_dtype(m, nq.inputs[1]),
                                      qk_layer=nq.kind == "head_layer_norm")
    kernel = RopeKVWrite(n_heads=rq.attrs["n_heads"], n_kv_heads=rk.attrs["n_heads"], head_dim=rq.attrs["head_dim"],
                         qkv_cols=m.graph.node(qkv).type.shape[1], q_offset=sq.attrs["start"],
                         k_offset=sk.attrs["start"], v_offset=sv.attrs["start"], act=rq.type.dtype,
                         rotary_dim=2 * len(inv_freq), interleaved=rq.attrs.get("interleaved", False),
                         cache=_cache_dtype(kvw.type.dtype, rq.type.dtype), **norm)
    cache = kvw.inputs[2]
    args = {"qkv": V(qkv), "positions": V(rq.inputs[1]), "cos_sin": Arg("const", table),
            "slots": V(kvw.inputs[3]), "k_cache": Arg("k_cache", cache), "v_cache": Arg("v_cache", cache),
            "q_out": V(rq.name), "num_tokens": D(_rows(rq))}
    if nq is not None:
        args |= {"q_norm_w": V(nq.inputs[1]), "k_norm_w": V(nk.inputs[1])}
    return ctx.kernel_launch(m, kernel, args, (rq.name, kvw.name), {"num_tokens": _rows(rq)})


ROPE_KV = (PNode("q", "slice"), PNode("k", "slice"), PNode("v", "slice"),
           PNode("q_rope", "rope", (("q", 0),)), PNode("k_rope", "rope", (("k", 0),)),
           PNode("kv_write", "kv_write", (("k_rope", 0), ("v", 1))))
def _qk_norm_rope_kv(kind: str) -> tuple[PNode, ...]:
    return (PNode("q", "slice"), PNode("k", "slice"), PNode("v", "slice"),
            PNode("q_norm", kind, (("q", 0),)), PNode("k_norm", kind, (("k", 0),)),
            PNode("q_rope", "rope", (("q_norm", 0),)), PNode("k_rope", "rope", (("k_norm", 0),)),
            PNode("kv_write", "kv_write", (("k_rope", 0), ("v", 1))))


# -- single ops -----------------------------------------------------------------------
def lower_attention(m: Match, ctx: LowerContext) -> Launch:
    a = m["attention"]
    q, cache, tables, ctx_lens, qstart = a.inputs
    head_dim, n_heads, n_kv_heads = a.attrs["head_dim"], a.attrs["n_heads"], a.attrs["n_kv_heads"]
    # A block serves a KV head's group of query heads (K/V read once a group), except in
    # the GPU's GEMV plan (few-token steps), where that leaves a block per KV head (4 for
    # Qwen2.5-7B at N=1, 27 us a layer on an H100): there a block per query head fills
    # the GPU and the extra K/V reads are a few KB
    grouped = not ctx.gpu_shapes or ctx.bucket != "gemv"
    kv = m.graph.node(cache).type.dtype
    kernel = PagedAttention(n_heads=n_heads, n_kv_heads=n_kv_heads,
                            head_dim=head_dim, block_size=m.graph.node(cache).type.shape[2],
                            scale=a.attrs["scale"], sliding_window=a.attrs.get("sliding_window") or 0,
                            act=a.type.dtype, vec=vector_width(head_dim, a.type.dtype, kv) if ctx.gpu_shapes else 1,
                            heads_per_block=heads_per_block(n_heads // n_kv_heads) if grouped else 1,
                            softcap=a.attrs.get("softcap") or 0.0, cache=_cache_dtype(kv, a.type.dtype))
    args = {"q": V(q), "k_cache": Arg("k_cache", cache), "v_cache": Arg("v_cache", cache),
            "block_tables": V(tables), "context_lens": V(ctx_lens), "query_start_loc": V(qstart), "out": V(a.name),
            "num_seqs": D(m.graph.node(ctx_lens).type.shape[0]), "table_width": D(m.graph.node(tables).type.shape[1])}
    return ctx.kernel_launch(m, kernel, args, (a.name,), {"num_tokens": _rows(a)})


def attention_constraint(m: Match) -> bool:
    a = m["attention"]
    return m.graph.node(a.inputs[0]).type.dtype == a.type.dtype  # the cache may be in another float dtype


def lower_embed(m: Match, ctx: LowerContext) -> Launch:
    e = m["embed"]
    ids, table = e.inputs
    kernel = Embed(cols=e.type.shape[1], table=_dtype(m, table), out=e.type.dtype,
                   table_format=m.graph.node(table).format, scale=e.attrs.get("scale", 1.0))
    return ctx.kernel_launch(m, kernel, {"ids": V(ids), "table": V(table), "y": V(e.name), "num_rows": D(_rows(e))},
                             (e.name,), {"num_rows": _rows(e)})


def lower_add_rms_norm(m: Match, ctx: LowerContext) -> Launch:
    add, norm = m.get("add"), m["norm"]
    layer = norm.kind == "layer_norm"
    kernel = AddRmsNorm(cols=norm.type.shape[1], act=norm.type.dtype, weight=_dtype(m, norm.inputs[1]),
                        eps=norm.attrs["eps"], add=add is not None, layer=layer)
    args = {"norm_w": V(norm.inputs[1]), "y": V(norm.name), "num_rows": D(_rows(norm))}
    if layer:
        args["norm_b"] = V(norm.inputs[2])
    if add is not None:
        args |= {"a": V(add.inputs[0]), "b": V(add.inputs[1]), "sum": V(add.name)}
    else:
        args["x"] = V(norm.inputs[0])
    outputs = (norm.name, add.name) if add is not None else (norm.name,)
    return ctx.kernel_launch(m, kernel, args, outputs, {"num_rows": _rows(norm)})


def same_act_dtype(m: Match) -> bool:
    """Activations in and out share one dtype (weights and int32 indices aside)."""
    dtypes = {n.type.dtype for n in m.roles.values()}
    for n in m.roles.values():
        for i in n.inputs:
            src = m.graph.node(i)
            if src.kind != "weight" and src.type.dtype is not DType.I32:
                dtypes.add(src.type.dtype)
    return len(dtypes) == 1


def _row_op(role: str, kernel_of, arg_names: tuple[str, ...]):
    def lower(m: Match, ctx: LowerContext) -> Launch:
        node = m[role]
        args = {name: V(src) for name, src in zip(arg_names, node.inputs)}
        args |= {"y": V(node.name), "num_rows": D(_rows(node))}
        return ctx.kernel_launch(m, kernel_of(m, node), args, (node.name,), {"num_rows": _rows(node)})
    return lower


def _gated_row(node: Node) -> SiluMul:
    groups = node.attrs.get("groups", 1)
    return SiluMul(node.type.shape[1] // groups, node.type.dtype, node.kind, groups)


def lower_gemm(m: Match, ctx: LowerContext) -> Launch:
    mm = m["matmul"]
    return Launch(name=mm.name, pattern=m.pattern.name, nodes=(), kind="gemm",
                  args=(V(mm.inputs[0]), V(mm.inputs[1])), outputs=(mm.name,))


def default_registry() -> Registry:
    reg = Registry()
    for p in gemv_patterns():
        reg.register(p)
    reg.register(Pattern("rope_kv_write", 70, ROPE_KV, lower_rope_kv, constraint=rope_kv_constraint,
                         doc="RoPE on q and k + k, v written into the paged cache"))
    reg.register(Pattern("qk_norm_rope_kv_write", 72, _qk_norm_rope_kv("head_rms_norm"), lower_rope_kv,
                         constraint=rope_kv_constraint,
                         doc="per-head RMSNorm of q and k (Qwen3) + RoPE + k, v written into the paged cache"))
    reg.register(Pattern("qk_layer_norm_rope_kv_write", 72, _qk_norm_rope_kv("head_layer_norm"), lower_rope_kv,
                         constraint=rope_kv_constraint,
                         doc="per-head LayerNorm of q and k (Cohere) + RoPE + k, v written into the paged cache"))
    reg.register(Pattern("paged_attention", 65, (PNode("attention", "attention"),), lower_attention,
                         constraint=attention_constraint, doc="causal paged GQA attention (decode and prefill)"))
    reg.register(Pattern("embed", 10, (PNode("embed", "embed"),), lower_embed, doc="embedding rows"))
    reg.register(Pattern("add_rms_norm", 15, (ADD, NORM_AFTER_ADD), lower_add_rms_norm, buckets=("gemm",),
                         escapes=frozenset({"add"}), constraint=same_act_dtype,
                         doc="residual add + RMSNorm between library GEMMs"))
    reg.register(Pattern("rms_norm", 5, (NORM,), lower_add_rms_norm, constraint=same_act_dtype, doc="RMSNorm"))
    reg.register(Pattern("add_layer_norm", 15, (ADD, _as_layer_norm(NORM_AFTER_ADD)), lower_add_rms_norm,
                         buckets=("gemm",), escapes=frozenset({"add"}), constraint=same_act_dtype,
                         doc="residual add + LayerNorm between library GEMMs"))
    reg.register(Pattern("layer_norm", 5, (_as_layer_norm(NORM),), lower_add_rms_norm, constraint=same_act_dtype,
                         doc="LayerNorm"))
    reg.register(Pattern("gemm", 5, (_mm(None),), lower_gemm, buckets=("gemm",), doc="library GEMM"))
    reg.register(Pattern("bias_add", 5, (PNode("bias_add", "bias_add"),),
                         _row_op("bias_add", lambda m, n: BiasAdd(n.type.shape[1], n.type.dtype, _dtype(m, n.inputs[1])),
                                 ("x", "bias")), constraint=same_act_dtype, doc="bias add"))
    reg.register(Pattern("gelu_tanh_mul", 5, (PNode("gelu_tanh_mul", "gelu_tanh_mul"),),
                         _row_op("gelu_tanh_mul", lambda m, n: _gated_row(n), ("gu",)), constraint=same_act_dtype,
                         doc="GELU-tanh(gate) * up (per group)"))
    reg.register(Pattern("silu_mul", 5, (PNode("silu_mul", "silu_mul"),),
                         _row_op("silu_mul", lambda m, n: _gated_row(n), ("gu",)),
                         constraint=same_act_dtype, doc="SiLU(gate) * up (per group)"))
    reg.register(Pattern("gather_rows", 5, (PNode("gather_rows", "gather_rows"),),
                         _row_op("gather_rows", lambda m, n: GatherRows(n.type.shape[1], n.type.dtype), ("x", "rows")),
                         constraint=same_act_dtype, doc="row gather (rows that need logits)"))
    for kind, attr, doc in (("gelu", None, "GELU (erf)"), ("scale", "factor", "x * factor (Cohere's logit_scale)"),
                            ("softcap", "cap", "cap * tanh(x / cap) (Gemma 2's final logits)")):
        unary = lambda m, n, kind=kind, attr=attr: Unary(n.type.shape[1], n.type.dtype, kind,
                                                         n.attrs[attr] if attr else 0.0)
        reg.register(Pattern(kind, 5, (PNode(kind, kind),), _row_op(kind, unary, ("x",)), constraint=same_act_dtype,
                             doc=doc))
    reg.register(Pattern("add", 4, (PNode("add", "add"),),
                         _row_op("add", lambda m, n: Add(n.type.shape[1], n.type.dtype), ("a", "b")),
                         constraint=same_act_dtype, doc="elementwise add"))
    from fusec.kernels.mla import mla_patterns  # they lower with this module's helpers
    from fusec.kernels.moe import moe_patterns
    for p in moe_patterns() + mla_patterns():
        reg.register(p)
    return reg
