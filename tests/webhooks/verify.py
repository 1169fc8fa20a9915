"""Verifies webhook deliveries with the reference implementation of the Standard Webhooks
specification (the `standardwebhooks` package from PyPI), as a receiver would. Run by
`tests/tests/integration/webhooks.rs`.

Reads JSON on stdin: {"deliveries": [{"headers": {...}, "body": "..."}],
"secrets": {"<user>": ["whsec_...", ...]}}. Every delivery must verify with every secret listed
for its job's user (during a rotation both the old and the new one must). Prints one line of
counts; exits non-zero naming the first delivery that does not verify.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

given = json.load(sys.stdin)
verified = 0
for delivery in given["deliveries"]:
    body = delivery["body"]
    user = json.loads(body)["data"]["user_id"]
    for secret in given["secrets"][user]:
        try:
            payload = Webhook(secret).verify(body, delivery["headers"])
        except WebhookVerificationError as error:
            print(f"FAILED {delivery['headers'].get('webhook-id')}: {error}")
            sys.exit(1)
        if payload["data"]["user_id"] != user:
            print(f"FAILED {delivery['headers'].get('webhook-id')}: payload mismatch")
            sys.exit(1)
        verified += 1
print(f"verified {verified} signatures on {len(given['deliveries'])} deliveries")
