"""Schemathesis hooks for Sluice's API run (tests/tests/integration/schema.rs).

An `Idempotency-Key` names one submission: the same key with another body is refused with
`422 idempotency_key_reused`, as the IETF draft on the header asks. Schemathesis draws keys from
a small space and would reuse one across different bodies, so before each call every valid key
is made unique; keys that are invalid (and must be refused) are left as they are.
"""

import uuid

import schemathesis


def _valid(key):
    return isinstance(key, str) and 1 <= len(key) <= 255 and all("!" <= c <= "~" for c in key)


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    if _valid(headers.get("Idempotency-Key")):
        headers["Idempotency-Key"] = f"{headers['Idempotency-Key'][:200]}-{uuid.uuid4()}"
