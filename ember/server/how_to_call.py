"""What `ember serve` and `ember up` print once ready: the URL and an example request (no
server dependencies, so the fleet launcher and benches import it without them)."""

HOW_TO_CALL = """\
ember is serving {name!r} at {base}
  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello"}}], \
"max_tokens": 32}}'
  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}", api_key="{key}"); \
print(c.chat.completions.create(model="{name}", max_tokens=32, \
messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'
  Metrics at {root}/metrics, the OpenAPI schema at {root}/openapi.json. Ctrl-C stops.
"""
