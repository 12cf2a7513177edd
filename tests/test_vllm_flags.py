"""`vllm serve`'s launch flags on `fusec serve`: each parses to the setting it names, the
ones fusec cannot honour here fail with one line, and a real vLLM launch line serves."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from fusec.cli.serve import serve_cmd
from fusec.errors import InputError
from fusec.models.generation_config import default_sampling, eos_token_ids
from fusec.runtime.config import EngineConfig
from fusec.runtime.server.protocol import ChatCompletionRequest
from server_helpers import FUSEC, free_port, write_tiny_chat_model


def parse(*args: str) -> dict:
    """`fusec serve ARGS`'s parsed parameters (nothing runs)."""
    return serve_cmd.make_context("serve", list(args)).params


# flag(s) -> the EngineConfig field and the value it must hold
ENGINE_FLAGS = [
    (["--model", "m"], "model", "m"),
    (["--tokenizer", "TOKENIZER"], "tokenizer", "TOKENIZER"),  # paths filled in by the test: they must exist
    (["--chat-template", "TEMPLATE"], "chat_template", "TEMPLATE"),
    (["--chat-template", "{{ messages[0].content }}"], "chat_template", "{{ messages[0].content }}"),
    (["--generation-config", "vllm"], "generation_config", "vllm"),
    (["--override-generation-config", '{"temperature": 0.5}'], "override_generation_config", '{"temperature": 0.5}'),
    (["--dtype", "half"], "dtype", "half"),
    (["--dtype", "float"], "dtype", "float"),
    (["--dtype", "bfloat16"], "dtype", "bfloat16"),
    (["--quantization", "q8_0"], "quantization", "q8_0"),
    (["-q", "q4_0"], "quantization", "q4_0"),
    (["--load-format", "dummy"], "load_format", "dummy"),
    (["--seed", "7"], "seed", 7),
    (["--device", "cpu"], "device", "cpu"),
    (["--max-model-len", "2048"], "max_model_len", 2048),
    (["--max-model-len", "2k"], "max_model_len", 2000),
    (["--max-model-len", "2K"], "max_model_len", 2048),
    (["--max-model-len", "-1"], "max_model_len", None),
    (["--max-model-len", "32.7k"], "max_model_len", 32700),
    (["--max-num-seqs", "8"], "max_num_seqs", 8),
    (["--max-num-batched-tokens", "4k"], "max_num_batched_tokens", 4000),
    (["--enable-chunked-prefill"], "enable_chunked_prefill", True),
    (["--no-enable-chunked-prefill"], "enable_chunked_prefill", False),
    (["--block-size", "32"], "block_size", 32),
    (["--kv-cache-dtype", "auto"], "kv_cache_dtype", "auto"),
    (["--swap-space", "8"], "swap_space", 8.0),
    (["--gpu-memory-utilization", "0.5"], "gpu_memory_utilization", 0.5),
    (["--enable-prefix-caching"], "enable_prefix_caching", True),
    (["--no-enable-prefix-caching"], "enable_prefix_caching", False),
    (["--enforce-eager"], "enforce_eager", True),
    (["--no-enforce-eager"], "enforce_eager", False),
    (["--no-trust-remote-code"], "trust_remote_code", False),
    (["--max-logprobs", "5"], "max_logprobs", 5),
    (["--tensor-parallel-size", "1"], "tensor_parallel_size", 1),
    (["-tp", "1"], "tensor_parallel_size", 1),
    (["--pipeline-parallel-size", "1"], "pipeline_parallel_size", 1),
    (["-dp", "1"], "data_parallel_size", 1),
    (["--num-gpu-blocks-override", "40"], "num_kv_blocks", 40),
    (["--trust-remote-code"], "trust_remote_code", True),
]


@pytest.mark.parametrize("args, name, value", ENGINE_FLAGS, ids=[" ".join(a) for a, _, _ in ENGINE_FLAGS])
def test_engine_flag_reaches_its_config_field(args, name, value, tmp_path):
    files = {"TOKENIZER": tmp_path / "tokenizer.json", "TEMPLATE": tmp_path / "t.jinja"}
    for path in files.values():
        path.write_text("{}")
    args = [str(files.get(a, a)) for a in args]
    value = str(files[value]) if value in files else value
    config = vars(EngineConfig.from_options(parse(*args)))
    assert config.pop(name) == value
    defaults = vars(EngineConfig())
    defaults.pop(name)
    assert config == defaults, "the flag moved another field"


def test_server_flags_parse(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_text("k")
    cert.write_text("c")
    p = parse("smol-model", "--host", "0.0.0.0", "--port", "9001", "--served-model-name", "a", "b", "c",
              "--api-key", "secret", "other", "--disable-log-requests", "--enable-log-requests",
              "--disable-uvicorn-access-log", "--disable-fastapi-docs", "--disable-log-stats", "--enable-auto-tool-choice",
              "--tool-call-parser", "hermes", "--allowed-origins", '["http://localhost:3000"]',
              "--allowed-methods", '["GET", "POST"]', "--allowed-headers", '["Content-Type"]', "--allow-credentials",
              "--root-path", "/api", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--ssl-cert-reqs", "1",
              "--uvicorn-log-level", "warning")
    assert p["model_tag"] == "smol-model" and p["host"] == "0.0.0.0" and p["port"] == 9001
    assert p["served_names"] == ("a", "b", "c")  # nargs="+": every value up to the next option
    assert p["api_keys"] == ("secret", "other") and p["disable_log_requests"] and p["disable_log_stats"]
    assert p["enable_log_requests"] and p["disable_uvicorn_access_log"] and p["disable_fastapi_docs"]
    assert p["enable_auto_tool_choice"] and p["tool_call_parser"] == "hermes"
    assert p["allowed_origins"] == ["http://localhost:3000"] and p["allowed_methods"] == ["GET", "POST"]
    assert p["allowed_headers"] == ["Content-Type"] and p["allow_credentials"]
    assert p["root_path"] == "/api" and p["ssl_keyfile"] == str(key) and p["ssl_certfile"] == str(cert)
    assert p["ssl_cert_reqs"] == 1 and p["uvicorn_log_level"] == "warning"
    defaults = parse()
    assert defaults["host"] is None  # all interfaces, as vLLM
    assert defaults["allowed_origins"] == ["*"] and not defaults["allow_credentials"]
    assert parse("--served-model-name", "x", "m")["served_names"] == ("x", "m")  # argparse's nargs="+" too


def test_config_refusals_name_the_reason():
    with pytest.raises(InputError, match="one device"):
        EngineConfig(tensor_parallel_size=2)
    with pytest.raises(InputError, match="kv-cache-dtype fp8"):
        EngineConfig(kv_cache_dtype="fp8")
    with pytest.raises(InputError, match=r"User-specified max_model_len \(4096\) is greater than the derived"):
        EngineConfig(max_model_len=4096).resolved_max_model_len(2048)
    assert EngineConfig(max_model_len=1024).resolved_max_model_len(2048) == 1024
    with pytest.raises(InputError, match=r"max_num_batched_tokens \(1024\) is smaller than max_model_len \(2048\)"):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=1024).resolved_max_model_len(2048)
    unchunked = EngineConfig(enable_chunked_prefill=False)  # vLLM's default budget then holds the context
    assert unchunked.resolved_max_model_len(8192) == 8192 and unchunked.resolved_max_num_batched_tokens(8192) == 8192
    assert EngineConfig().resolved_max_num_batched_tokens(8192) == 1024
    # what the flags name is checked before any model loads
    with pytest.raises(InputError, match="out-of-range values for \\['temperature'\\]"):
        EngineConfig(override_generation_config='{"temperature": -1}')
    with pytest.raises(InputError, match="looks like a file path"):
        EngineConfig(chat_template="missing.jinja")


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 7, "do_sample": True, "bos_token_id": 1,
         "repetition_penalty": 1.0, "eos_token_id": [2, 7]}))
    # values equal to transformers' defaults (repetition_penalty 1.0) are not defaults (vLLM reads the diff)
    assert default_sampling("auto", tmp_path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_tokens": 7}
    assert eos_token_ids(tmp_path) == {2, 7}
    assert default_sampling("vllm", tmp_path) == {}
    assert default_sampling(str(tmp_path), tmp_path / "elsewhere.gguf") == default_sampling("auto", tmp_path)
    assert default_sampling("auto", tmp_path / "model.gguf") == {}  # a GGUF has none
    defaults = default_sampling("auto", tmp_path)
    unset = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]).sampling_params(None, None, defaults)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.max_tokens) == (0.6, 0.9, 20, None)  # cap: engine's
    given = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], temperature=0.0, top_k=-1)
    params = given.sampling_params(3, None, defaults)
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens) == (0.0, 0, 0.9, 3)
    # --override-generation-config: merged over the file, or alone under `vllm`
    assert default_sampling("auto", tmp_path, '{"temperature": 0.2, "max_new_tokens": 99}') == {
        "temperature": 0.2, "top_p": 0.9, "top_k": 20, "max_tokens": 99}
    assert default_sampling("vllm", tmp_path, '{"top_k": 5}') == {"top_k": 5}
    for bad in ('{"temp": 1}', "[1]", '{"top_k": "5"}', "{"):
        with pytest.raises(InputError, match="--override-generation-config"):
            default_sampling("vllm", tmp_path, bad)


def run_serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*FUSEC, "serve", *args], capture_output=True, text=True, timeout=timeout)


def test_port_in_use_fails_before_the_model_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        res = run_serve("--host", "127.0.0.1", "--port", str(port))
        elapsed = time.monotonic() - start
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip() == f"Error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert elapsed < 15  # interpreter start-up only: no model load, no kernel compile


@pytest.mark.parametrize("args, expected", [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2: fusec runs a model on one device"),
    (["--max-model-len", "100k"], "User-specified max_model_len (100000) is greater than the derived max_model_len"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8"),
    (["--chat-template", "no/such/template.jinja"], "looks like a file path, but it failed to be opened"),
    (["--tokenizer", "no/such/tokenizer"], "neither a tokenizer.json file nor a directory holding one"),
    (["--generation-config", "no/such/dir"], "no generation_config.json there"),
], ids=["tp2", "max-model-len", "kv-fp8", "chat-template", "tokenizer", "generation-config"])
def test_unservable_flag_is_one_line_exit_2(args, expected):
    res = run_serve("--port", str(free_port()), *args)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("INFO")]
    assert len(lines) == 1 and expected in lines[0], res.stderr


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    key, cert = where / "key.pem", where / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    return key, cert


@pytest.mark.slow
def test_a_vllm_launch_line_serves_chat(tmp_path, smollm2_path, tls_files):
    """Every vLLM flag fusec takes, with values that make sense on the CPU: the model
    without its tokenizer (--tokenizer gives it), a template file, a generation config,
    TLS under a root path, CORS for one origin."""
    model = write_tiny_chat_model(tmp_path / "model", smollm2_path)
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(model / name, tok_dir / name)
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\nSure:{% endif %}")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 6}))
    key, cert = tls_files
    port = free_port()
    line = [str(model), "--served-model-name", "tiny", "tiny-alias", "--host", "127.0.0.1", "--port", str(port),
            "--tensor-parallel-size", "1", "--trust-remote-code", "--tokenizer", str(tok_dir),
            "--chat-template", str(template), "--generation-config", str(gen), "--max-logprobs", "5",
            "--dtype", "float", "--max-model-len", "256", "--block-size", "16", "--swap-space", "0",
            "--kv-cache-dtype", "auto", "--quantization", "auto", "--load-format", "auto", "--seed", "0",
            "--gpu-memory-utilization", "0.9", "--enforce-eager", "--enable-prefix-caching",
            "--enable-chunked-prefill", "--max-num-batched-tokens", "512", "--max-num-seqs", "8",
            "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--uvicorn-log-level", "warning",
            "--disable-log-stats", "--disable-log-requests", "--api-key", "sk-test",
            "--allowed-origins", '["http://localhost:3000"]', "--allowed-methods", '["GET", "POST", "OPTIONS"]',
            "--allowed-headers", '["Content-Type", "Authorization"]', "--allow-credentials", "--root-path", "/api",
            "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--device", "cpu"]
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([*FUSEC, "serve", *line], stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"https://127.0.0.1:{port}"
    client = httpx.Client(verify=False, timeout=60, headers={"Authorization": "Bearer sk-test"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if client.get(base + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, Path(log.name).read_text()
                time.sleep(0.2)
        assert [m["id"] for m in client.get(base + "/v1/models").json()["data"]] == ["tiny", "tiny-alias"]
        assert client.get(base + "/v1/models/tiny-alias").json()["id"] == "tiny-alias"
        missing = client.get(base + "/v1/models/other")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"
        assert client.get(base + "/openapi.json").json()["servers"] == [{"url": "/api"}]  # --root-path

        chat = {"model": "tiny-alias", "messages": [{"role": "user", "content": "Hello there"}]}
        answer = client.post(base + "/v1/chat/completions", json=chat)  # the proxy strips /api
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model"] == "tiny-alias" and body["choices"][0]["message"]["role"] == "assistant"
        # --generation-config: unset max_tokens and temperature come from it (greedy, 6 tokens)
        assert body["usage"]["completion_tokens"] == 6 or body["choices"][0]["finish_reason"] == "stop"
        again = client.post(base + "/v1/chat/completions", json=chat).json()
        assert again["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
        # --chat-template: the prompt ends with the template's own words
        rendered = client.post(base + "/tokenize", json={"model": "tiny", "messages": chat["messages"]}).json()
        text = client.post(base + "/detokenize", json={"model": "tiny", "tokens": rendered["tokens"]}).json()
        assert text["prompt"].endswith("<|im_start|>assistant\nSure:")
        # --max-logprobs 5
        too_many = client.post(base + "/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 6})
        assert too_many.status_code == 400
        assert too_many.json()["error"]["message"] == ("Requested sample logprobs of 6, which is greater than max "
                                                        "allowed: 5")
        assert client.post(base + "/v1/chat/completions", json={**chat, "logprobs": True,
                                                               "top_logprobs": 5}).status_code == 200
        # CORS: the allowed origin's preflight passes with credentials, another origin's is refused
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        ok = httpx.options(base + "/v1/chat/completions", verify=False,
                           headers={"Origin": "http://localhost:3000", **preflight})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert ok.headers["access-control-allow-credentials"] == "true"
        assert "POST" in ok.headers["access-control-allow-methods"]
        refused = httpx.options(base + "/v1/chat/completions", verify=False,
                                headers={"Origin": "http://evil.example", **preflight})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        simple = client.get(base + "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert simple.headers["access-control-allow-origin"] == "http://localhost:3000"
        # --api-key still guards the API
        assert httpx.get(base + "/v1/models", verify=False).status_code == 401
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
        client.close()
    out = Path(log.name).read_text()
    assert code == 0, out
    assert "fusec serving tiny " in out and f"https://127.0.0.1:{port}/api/v1" in out
    assert "Traceback" not in out


def test_docs_list_every_serve_flag():
    """docs/api.md's flag table stays current: each of `serve`'s flags is in it."""
    docs = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    flags = {opt for p in serve_cmd.params for opt in p.opts if opt.startswith("--")}
    assert sorted(f for f in flags if f"`{f}`" not in docs) == []


def test_generation_config_max_new_tokens_caps_requests(tiny_checkpoints, tmp_path):
    """max_new_tokens caps every request and is an unset request's max_tokens, up to what
    the context leaves (never a 400 the client did not cause)."""
    from fusec.runtime.llm import LLM
    from fusec.runtime.sequence import SamplingParams

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoints["llama"], model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 1000, "temperature": 0.0}))
    llm = LLM(str(model), max_model_len=48, num_kv_blocks=32)
    try:
        prompt = [[3, 14, 15, 92, 65, 35, 89, 79]]
        unset = llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=None, ignore_eos=True))
        assert len(unset[0].outputs[0].token_ids) == 48 - 8  # the room left, not 1000
        (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    finally:
        llm.engine.close()
    llm = LLM(str(model), max_model_len=48, num_kv_blocks=32)
    try:
        asked = llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=20, ignore_eos=True))
        assert len(asked[0].outputs[0].token_ids) == 5
        default = llm.generate(prompt_token_ids=prompt)  # SamplingParams' own 16, under the cap
        assert len(default[0].outputs[0].token_ids) <= 5
    finally:
        llm.engine.close()
