"""The official OpenAI Python SDK against Sluice's OpenAI routes, as a user's code would call
them. Run by `tests/tests/integration/openai.rs` against a pipeline it started; each check
prints one line and any failure exits non-zero with the reason.

Environment: SLUICE_BASE_URL (ingest's `/v1`), SLUICE_API_KEY (a key on a roomy tier),
SLUICE_TINY_KEY (a key on a tier of one request a second, a burst of 1), SLUICE_SIM_URL (the
simulated model, checked as a backend the SDK can read).
"""

import math
import os
import sys
import time

import openai
from openai import OpenAI

base_url = os.environ["SLUICE_BASE_URL"]
client = OpenAI(base_url=base_url, api_key=os.environ["SLUICE_API_KEY"])


def check(name, condition, detail=""):
    if not condition:
        print(f"FAILED {name}: {detail}")
        sys.exit(1)
    print(f"ok {name}")


# Non-streaming chat: the simulated model answers `echo: <last user message>`.
raw = client.chat.completions.with_raw_response.create(
    model="sim", messages=[{"role": "user", "content": "hello from the sdk"}]
)
completion = raw.parse()
check(
    "chat completion",
    completion.choices[0].message.content == "echo: hello from the sdk",
    completion,
)
check("finish_reason", completion.choices[0].finish_reason == "stop", completion)
job_id = raw.headers.get("x-sluice-job-id")
check("x-sluice-job-id", job_id is not None and completion.id == f"chatcmpl-{job_id}", raw.headers)

# Streaming chat: the model takes 100 ms a token here, and its tokens reach the client while
# it is still generating, in order; they join into the answer; the last chunk has the usage.
stream = client.chat.completions.create(
    model="sim",
    messages=[{"role": "user", "content": "stream me these six words"}],
    stream=True,
    stream_options={"include_usage": True},
)
arrivals = []
chunks = []
for chunk in stream:
    chunks.append(chunk)
    if chunk.choices and chunk.choices[0].delta.content:
        arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
text = "".join(piece for _, piece in arrivals)
check("streamed text", text == "echo: stream me these six words", text)
check(
    "tokens arrive as generated",
    len(arrivals) >= 4 and arrivals[-1][0] - arrivals[0][0] >= 0.3,
    [(round(at - arrivals[0][0], 3), piece) for at, piece in arrivals],
)
print("  token arrivals, s after the first:", [(round(at - arrivals[0][0], 3), piece) for at, piece in arrivals])
check("stream usage", chunks[-1].usage is not None and chunks[-1].choices == [], chunks[-1])

# Embeddings with the in-process MiniLM: the SDK asks for base64 by default.
pair = ["A man is eating food.", "A man is eating a piece of bread."]
for encoding in (openai.NOT_GIVEN, "float"):
    embedded = client.embeddings.create(
        model="all-minilm-l6-v2", input=pair, encoding_format=encoding
    )
    a, b = (item.embedding for item in embedded.data)
    cosine = sum(x * y for x, y in zip(a, b)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    )
    check(
        f"embedding cosine ({encoding if isinstance(encoding, str) else 'sdk default'})",
        len(a) == 384 and abs(cosine - 0.7553) < 1e-3,
        f"{len(a)} dims, cosine {cosine:.4f}",
    )

# The models the front door names.
ids = sorted(model.id for model in client.models.list())
check("models", ids == ["all-minilm-l6-v2", "sim"], ids)

# Errors, as the SDK raises them.
try:
    OpenAI(base_url=base_url, api_key="sk-sluice-not-a-key").chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "x"}]
    )
    check("bad key", False, "no error raised")
except openai.AuthenticationError as error:
    check("bad key", error.status_code == 401, error)

try:
    client.chat.completions.create(model="sim", messages=[{"role": "robot", "content": "x"}])
    check("bad field", False, "no error raised")
except openai.BadRequestError as error:
    check("bad field", error.param == "messages[0].role", (error.param, error.message))

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check("unknown model", False, "no error raised")
except openai.NotFoundError as error:
    check("unknown model", error.code == "model_not_found", error)

# A burst of 1 at one per second: with no retries the second call is a RateLimitError carrying
# Retry-After; with the SDK's own retries, it waits as told and gets through.
tiny_key = os.environ["SLUICE_TINY_KEY"]
no_retries = OpenAI(base_url=base_url, api_key=tiny_key, max_retries=0)
no_retries.chat.completions.create(model="sim", messages=[{"role": "user", "content": "first"}])
try:
    no_retries.chat.completions.create(model="sim", messages=[{"role": "user", "content": "second"}])
    check("rate limited", False, "no error raised")
except openai.RateLimitError as error:
    check(
        "rate limited",
        error.status_code == 429 and error.response.headers.get("retry-after") == "1",
        (error, dict(error.response.headers)),
    )
started = time.monotonic()
retried = OpenAI(base_url=base_url, api_key=tiny_key).chat.completions.create(
    model="sim", messages=[{"role": "user", "content": "third"}]
)
waited = time.monotonic() - started
check(
    "the SDK's retry honours Retry-After",
    retried.choices[0].message.content == "echo: third" and waited >= 0.5,
    f"waited {waited:.2f} s",
)

# The simulated model (the tests' stand-in backend) streams as OpenAI does, tool calls too:
# the SDK's own stream parsing reads it.
sim = OpenAI(base_url=os.environ["SLUICE_SIM_URL"] + "/v1", api_key="unused")
sim_chunks = list(
    sim.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
)
pieces = [c.choices[0].delta.content for c in sim_chunks if c.choices and c.choices[0].delta.content]
check("sim streams tokens", pieces == ["echo:", " one", " two", " three"], pieces)
check("sim stream usage", sim_chunks[-1].usage.completion_tokens == 4, sim_chunks[-1])
tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def tool_round_trip(api, label):
    """A tool call, its result sent back, and a streamed tool call, through `api`."""
    called = api.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "find it"}], tools=tools
    )
    call = called.choices[0].message.tool_calls[0]
    check(
        f"tool call {label}",
        called.choices[0].finish_reason == "tool_calls"
        and called.choices[0].message.content is None
        and call.function.name == "lookup"
        and call.function.arguments == '{"text":"find it"}',
        called,
    )
    answered = api.chat.completions.create(
        model="sim",
        messages=[
            {"role": "user", "content": "find it"},
            called.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "found"},
        ],
        tools=tools,
    )
    check(f"tool result {label}", answered.choices[0].message.content == "echo: found", answered)
    streamed = list(
        api.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "find it, streamed"}], tools=tools, stream=True
        )
    )
    pieces = [
        tool_call
        for c in streamed
        if c.choices and c.choices[0].delta.tool_calls
        for tool_call in c.choices[0].delta.tool_calls
    ]
    arguments = "".join(piece.function.arguments or "" for piece in pieces)
    finish = [c.choices[0].finish_reason for c in streamed if c.choices and c.choices[0].finish_reason]
    check(
        f"streamed tool call {label}",
        pieces[0].function.name == "lookup"
        and arguments == '{"text":"find it, streamed"}'
        and finish == ["tool_calls"],
        streamed,
    )


tool_round_trip(sim, "from the sim")
# The same through Sluice: the job's output keeps the model's whole message, so the SDK gets the
# tool call, and the tool's result goes back as the next job.
tool_round_trip(client, "through sluice")

print("all OpenAI SDK checks passed")
