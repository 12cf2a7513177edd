"""`fusec run-batch -i in.jsonl -o out.jsonl`: an OpenAI batch file through the server's
app, offline (vLLM's `run-batch`)."""
from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import TYPE_CHECKING, TextIO

import click
from tqdm import tqdm

from fusec.cli.serve import SERVE_ENGINE_FIELDS, ServeCommand
from fusec.errors import FusecError
from fusec.runtime.config import EngineConfig, engine_options

if TYPE_CHECKING:
    from fastapi import FastAPI

    from fusec.runtime.server.batch import BatchRequestInput


def _local(path: str) -> str:
    if path.startswith(("http://", "https://")):
        raise FusecError(f"{path}: fusec run-batch reads and writes local files (or - for stdin / stdout), "
                         f"not URLs")
    return path


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return sys.stdin.read().splitlines()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise FusecError(f"{path}: not UTF-8 text") from None


def _open_output(path: str) -> contextlib.AbstractContextManager[TextIO]:
    return contextlib.nullcontext(sys.stdout) if path == "-" else open(path, "w", encoding="utf-8")


@click.command("run-batch", cls=ServeCommand)  # --served-model-name a b, as serve
@click.option("-i", "--input-file", required=True,
              help="The batch file: one request a line in OpenAI's batch format (- reads stdin).")
@click.option("-o", "--output-file", required=True,
              help="The results: one line a request, in input order (- writes stdout).")
@engine_options(*SERVE_ENGINE_FIELDS)
@click.option("--served-model-name", "served_names", multiple=True,
              help="Name(s) a request's `model` may give [default: the model]")
def run_batch_cmd(input_file: str, output_file: str, served_names: tuple[str, ...], **options) -> None:
    """Run an OpenAI batch file (/v1/chat/completions, /v1/completions, /v1/embeddings lines) like
    `vllm run-batch`."""
    from fusec.runtime.server.batch import parse_batch

    requests = parse_batch(_read_lines(_local(input_file)), "stdin" if input_file == "-" else input_file)
    # the output opens before the model loads: an unwritable path fails in a moment
    with _open_output(_local(output_file)) as out:
        from fusec.runtime.async_engine import AsyncEngine
        from fusec.runtime.engine import LLMEngine
        from fusec.runtime.server.app import ServerSettings, create_app

        engine = LLMEngine(EngineConfig.from_options(options))
        names = list(served_names) or [options["model"] or engine.model.name]
        async_engine = AsyncEngine(engine)
        try:
            app = create_app(async_engine, ServerSettings(names, model_path=str(engine.model.path)))
            click.echo(f"fusec run-batch: {len(requests)} requests to {names[0]} ({engine.device} backend)",
                       err=True)
            # twice the engine's batch in flight, as vLLM: the engine's queue never runs dry between steps
            ok = asyncio.run(_write_results(app, requests, out, 2 * engine.config.max_num_seqs))
        finally:
            async_engine.shutdown()
    where = "stdout" if output_file == "-" else output_file
    click.echo(f"fusec run-batch: {ok} ok, {len(requests) - ok} failed; results in {where}", err=True)


async def _write_results(app: FastAPI, requests: list[BatchRequestInput], out: TextIO, max_in_flight: int) -> int:
    from fusec.runtime.server.batch import run_batch

    ok = 0
    with tqdm(total=len(requests), desc="Running batch", unit="req") as bar:
        async for result in run_batch(app, requests, max_in_flight, on_done=lambda _: bar.update()):
            out.write(result.to_json() + "\n")
            ok += result.ok
    return ok
