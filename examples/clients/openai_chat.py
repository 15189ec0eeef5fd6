#!/usr/bin/env python3
# Run: NOA_TOKEN=$(cat ~/.local/share/noa/admin.token) python3 examples/clients/openai_chat.py [base_url]
# The official OpenAI Python client, unchanged, against NOA's OpenAI-compatible API: a whole answer, a stream,
# embeddings (the client asks for base64 by default), and an error.
import os
import sys

from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:7070/v1"
client = OpenAI(base_url=base, api_key=os.environ["NOA_TOKEN"])

print([m.id for m in client.models.list().data])
answer = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    temperature=0,
)
print(answer.choices[0].message.content)
print(answer.usage.total_tokens)
stream = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "Count from 1 to 5."}],
    max_tokens=32,
    temperature=0,
    stream=True,
)
pieces = 0
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        pieces += 1
        sys.stdout.write(chunk.choices[0].delta.content)
print()
print("pieces", pieces)
emb = client.embeddings.create(model="smollm2", input=["a cat sat on the mat", "the stock market fell"])
print("embeddings", len(emb.data), len(emb.data[0].embedding), emb.usage.prompt_tokens)
call = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
    tools=[{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
    tool_choice="required",
    parallel_tool_calls=False,
    max_tokens=96,
    temperature=0,
)
fn = call.choices[0].message.tool_calls[0].function
print("tool", fn.name, sorted(__import__("json").loads(fn.arguments)))
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
except Exception as e:  # openai.NotFoundError
    print("error", type(e).__name__, getattr(e, "status_code", None))
