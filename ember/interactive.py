"""`ember serve` until the HTTP server lands: the engine core in its own process, prompts from
stdin, tokens streamed back through the async client (the path the HTTP server will use).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from ember.config import EngineConfig
from ember.engine.sampling_params import SamplingParams

USAGE = """\
ember is running on {model}
  KV cache: {num_kv_tokens} tokens in {num_blocks} blocks; context {max_model_len} tokens.
Type a message and press Enter: it is sent as a chat turn and the reply streams back.
Ctrl-D or Ctrl-C stops. From Python, the same model offline:
    from ember import LLM, SamplingParams
    llm = LLM("{model}")
    print(llm.generate("Hello", SamplingParams(max_tokens=32))[0].outputs[0].text)
"""


async def _serve(model: str, options: dict[str, Any]) -> None:
    from ember.engine.async_client import AsyncEngineClient

    config = EngineConfig.from_options(model, **options)
    client = await AsyncEngineClient.start(config)
    try:
        runtime = client.runtime
        num_kv_tokens = runtime["num_blocks"] * runtime["block_size"]
        print(USAGE.format(model=model, num_kv_tokens=num_kv_tokens,
                           num_blocks=runtime["num_blocks"],
                           max_model_len=runtime["max_model_len"]), flush=True)
        params = SamplingParams(max_tokens=128, temperature=0.8, top_p=0.95)
        loop = asyncio.get_running_loop()
        while True:
            print("> ", end="", flush=True)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            if not line.strip():
                continue
            prompt = client.tokenizer.apply_chat_template(
                [{"role": "user", "content": line.strip()}], tokenize=False,
                add_generation_prompt=True)
            async for out in client.generate(prompt, params):
                print(out.outputs[0].delta_text, end="", flush=True)
            print(flush=True)
    finally:
        await client.shutdown()


def run_interactive(model: str, options: dict[str, Any]) -> int:
    try:
        asyncio.run(_serve(model, options))
    except KeyboardInterrupt:
        pass
    return 0
