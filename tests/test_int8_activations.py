"""int8 activations on the CPU (AVX-512 VNNI): GEMVs over q8_0 / q4_0 / q4_1 weights
quantize their input rows per group of 32 and take integer dot products
(kernels/gemv.py `int8_dots`). That changes the arithmetic, so greedy equality with the
reference no longer holds by construction; the bar instead: teacher-forced over a few
hundred tokens of real text, the fused plans' top-1 token equals the reference
interpreter's (float activations, the same weights) at >= 98% of positions."""
from __future__ import annotations

import numpy as np
import pytest

from fusec.fusion.codegen.target import HOST
from fusec.fusion.plan import has_int8_dots

needs_vnni = pytest.mark.skipif(not has_int8_dots(HOST), reason="the CPU has no AVX-512 VNNI")

AGREEMENT = 0.98  # the tolerance: share of positions whose top-1 tokens agree
TEXT = (
    "The lighthouse stood at the end of a narrow spit of rock, and for most of the year the keeper saw no one but "
    "the men who brought oil and bread from the village on the first day of each month. He kept a log of the "
    "weather, the ships that passed, and the birds that rested on the gallery rail during storms. In the winter "
    "the wind came straight off the sea and the glass of the lantern room rattled in its frame, so he wedged "
    "folded paper into the gaps and listened to the building breathe. When the fog rolled in he wound the "
    "clockwork of the horn every forty minutes, through the night if he had to, because a ship that lost its way "
    "in the channel would be on the reef before its captain heard the surf. Years later, when the light was "
    "automated and the keeper's house was sold, a historian found his logs in a trunk in the cellar. They were "
    "careful and plain: the height of the tide, the colour of the sky at dawn, the name of every vessel he could "
    "read through his glass. Only once did he write something else. On a night in March, after a schooner had "
    "passed safely within a cable's length of the rocks, he noted that he had been afraid, and that the fear had "
    "kept him awake until the sun came up over the water. Then the entries went on as before, the tide and the "
    "wind and the ships, for another eleven years, until the day the relief boat took him to the mainland and he "
    "did not come back."
)


@needs_vnni
def test_teacher_forced_top1_agrees_with_the_reference():
    from fusec.models.loader import load_model
    from fusec.runtime.backends.cpu import HostDevice
    from fusec.runtime.config import EngineConfig
    from fusec.runtime.model_runner import ModelRunner, SequenceChunk

    model = load_model(None)  # SmolLM2's Q4_1 GGUF: q4_1 matrices, a q8_0 LM head
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) >= 250
    config = EngineConfig(num_kv_blocks=len(ids) // 16 + 2, block_size=16, int8_activations=True)
    table = list(range(config.num_kv_blocks))
    reference = ModelRunner(model, config, None, max_model_len=16 * config.num_kv_blocks)
    want = reference.execute([SequenceChunk(ids, 0, table, all_logits=True)]).argmax(axis=1)
    device = HostDevice(threads=2)
    runner = ModelRunner(model, config, device, max_model_len=16 * config.num_kv_blocks)
    kernels = [k for k in runner.executor.plans["gemv"].kernels() if getattr(k, "int8_dots", False)]
    # the path under test is on, every matrix banded (SmolLM2's rows come in whole bands of 16)
    assert len(kernels) >= 5 and all(k.banded for k in kernels)
    assert runner.activations_note == " (int8 in quantized GEMVs)" and reference.activations_note == ""
    # the whole text as one prefill: tiles of 8 tokens
    prefill = runner.execute([SequenceChunk(ids, 0, table, all_logits=True)]).argmax(axis=1)
    # token by token: each step a one-token tile
    stepped = np.array([int(runner.execute([SequenceChunk([tok], i, table)])[0].argmax()) for i, tok in enumerate(ids)])
    runner.close()
    device.close()
    for how, got in (("prefill", prefill), ("one token a step", stepped)):
        agreement = float((got == want).mean())
        assert agreement >= AGREEMENT, f"{how}: top-1 agreement {agreement:.3f} over {len(ids)} positions"


def test_int8_activations_where_the_cpu_lacks_vnni_is_refused(monkeypatch, tiny_checkpoints):
    """--int8-activations on a CPU without VNNI (or on a GPU): a clear InputError, not a plan
    that cannot run."""
    import fusec.runtime.model_runner as model_runner
    from fusec.errors import InputError
    from fusec.models.loader import load_model
    from fusec.runtime.engine import EngineConfig, LLMEngine

    monkeypatch.setattr(model_runner, "has_int8_dots", lambda target: False)
    model = load_model(str(tiny_checkpoints["llama"]), quantization="q8_0")
    with pytest.raises(InputError, match="AVX-512 VNNI"):
        LLMEngine(EngineConfig(int8_activations=True, num_kv_blocks=8), model=model)
