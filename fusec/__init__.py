"""fusec: a compiler-centric LLM inference engine.

    from fusec import LLM, SamplingParams
    llm = LLM()  # SmolLM2-135M-Instruct on the CPU
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].outputs[0].text)
"""
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "PoolingParams", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from fusec.runtime.llm import LLM
    from fusec.runtime.sequence import PoolingParams, SamplingParams


def __getattr__(name: str) -> Any:
    # lazy, so `import fusec` (and the CLI) stays fast and light
    if name == "LLM":
        from fusec.runtime.llm import LLM

        return LLM
    if name in ("SamplingParams", "PoolingParams"):
        from fusec.runtime import sequence

        return getattr(sequence, name)
    raise AttributeError(name)
